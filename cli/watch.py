"""`vqret watch` (and `vqret index --watch`, `vqret serve --watch`): keep a store in step with
its folder as files change; `vqret bench watch`: how soon a new file can be found.

The watching is retrieval/watch.py's; here it is only started and its rounds printed, with
cli/main.py's own `_run_index` and `_print_summary` (handed over by `register`, because
`python -m vqret.cli.main` runs that module as __main__ and importing it again would run it
twice).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from vqret.cli.errors import clean_errors, fail

out = Console()
err = Console(stderr=True)

_hooks: dict[str, Callable[..., Any]] = {}  # main's _run_index and _print_summary

PollOpt = Annotated[
    bool,
    typer.Option("--poll", help="Stat the folder every 0.3 s instead of waiting for events "
                 "(network mounts: NFS, SMB, sshfs send none)."),
]


def register(app: typer.Typer, run_index: Callable[..., Any],
             print_summary: Callable[..., Any]) -> None:
    """Add `watch` to `app` and `watch` to its `bench` sub-app."""
    _hooks.update(run_index=run_index, print_summary=print_summary)
    app.command("watch")(watch)
    for group in app.registered_groups:
        if group.name == "bench" and group.typer_instance is not None:
            group.typer_instance.command("watch")(bench_watch)


# ------------------------------------------------------------------------------------------
# watch
# ------------------------------------------------------------------------------------------


def watch(
    folder: Annotated[
        Path | None,
        typer.Argument(help="Folder of images to keep indexed (default: the folder of the "
                       "store found from here up, or of --store)."),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option("--store", help="Store folder (default: FOLDER/.vqret, or found upwards)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="open_clip model name or config JSON (default: ViT-B-32, or the "
                     "store's model)"),
    ] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="Pretrained tag or weights file (default: the store's)")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")] = (
        "auto"
    ),
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    workers: Annotated[
        int | None, typer.Option(help="Decode processes (default: 1 per 8 CPU cores).")
    ] = None,
    index_type: Annotated[
        str | None,
        typer.Option("--index", help="auto | flat | hnsw | ivf | ivfpq (default: the store's)"),
    ] = None,
    commit_every: Annotated[
        int | None,
        typer.Option("--commit-every", min=1, help="Commit after this many new images, or 30 s."),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(help="Seconds a pass waits for another writer of the store (then it "
                     "retries on the next tick)."),
    ] = 0.0,
    poll: PollOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per commit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no summary.")] = False,
) -> None:
    """Index FOLDER, then keep the store in step as files are added, changed, renamed or
    deleted (Ctrl-C to stop; a restart catches up)."""
    with clean_errors():
        from vqret.api import Collection
        from vqret.retrieval.store import Store, StoreError, find_store

        if folder is None:
            found = Path(store) if store is not None else find_store()
            if found is None:
                fail("no vqret store in this folder or its parents: pass FOLDER")
            folder = Store.open(found).root
        if not folder.is_dir():
            fail(f"{folder}: not a folder")
        try:
            collection = Collection.create(
                folder, store, model=model, pretrained=pretrained, device=device,
                precision=precision, batch_size=batch_size, num_workers=workers,
            )
        except StoreError as e:
            fail(str(e))
        options = _index_options(wait, index_type, commit_every)
    keep_watching(collection, str(folder), options, poll=poll, as_json=as_json, quiet=quiet,
                  first_pass=True)


def _index_options(wait: float, index_type: str | None, commit_every: int | None) -> dict:
    options: dict[str, Any] = {"wait": wait, "index_kind": index_type}
    if commit_every is not None:
        options["commit_every"] = commit_every
    return options


def keep_watching(
    collection: Any,
    folder: str,
    options: dict,
    *,
    poll: bool,
    as_json: bool,
    quiet: bool,
    first_pass: bool,
    run_index: Callable[..., Any] | None = None,
    print_summary: Callable[..., Any] | None = None,
) -> None:
    """Watch `folder` until Ctrl-C: a pass per burst of changes, printed as `index` prints
    its run (one JSON line per pass with --json). `first_pass`: catch up first (`vqret
    index --watch` has just run its own)."""
    run_index = run_index or _hooks["run_index"]
    print_summary = print_summary or _hooks["print_summary"]
    show_progress = not (as_json or quiet) and err.is_terminal
    with clean_errors():
        from vqret.retrieval.watch import FolderWatcher, Round

        def index_once(walk) -> Any:
            return run_index(collection, folder, {**options, "walk": walk}, show_progress, quiet)

        def on_round(done: Round) -> None:
            if done.first:
                # once per model, as `index` does: text searches then start without torch
                collection.prepare_fast_text_search()
            if as_json:
                print(json.dumps(done.to_dict()), flush=True)
            elif not quiet and (done.first or _changed(done)):
                print_summary(done.report, collection)
                if done.held:
                    err.print(f"{len(done.held)} file(s) still being written: indexed once "
                              "complete", highlight=False)

        watcher = FolderWatcher(collection.store, folder, index_once, poll=poll,
                                on_round=on_round, on_error=_print_error(quiet))
        if not (as_json or quiet):
            err.print(f"watching {folder}{' (polling)' if poll else ''}; Ctrl-C to stop",
                      highlight=False)
        watcher.run(first_pass)


def _changed(done: Any) -> bool:
    d = done.report.to_dict()
    return bool(done.report.failed or any(d[k] for k in ("added", "updated", "renamed",
                                                         "removed")))


def _print_error(quiet: bool) -> Callable[[str], None]:
    def on_error(message: str) -> None:
        if not quiet:
            err.print(f"[yellow]watch:[/] {message}", highlight=False, soft_wrap=True)

    return on_error


def watch_served(service: Any, poll: bool) -> list[Any]:
    """`vqret serve --watch`: a watcher thread per served store of a local folder, indexing
    with the model the server already loaded; the server picks each commit up by the store's
    generation, as it does for any other writer."""
    from vqret.retrieval.store import Store
    from vqret.retrieval.watch import watch_folder

    watchers = []
    for served in service.stores.values():
        if served.store.root_url is not None:
            err.print(f"[yellow]warning:[/] {served.name}: remote images ({served.store.root_url}) "
                      "can't be watched", highlight=False)
            continue
        name = served.name

        def on_round(done: Any, name: str = name) -> None:
            if done.first or _changed(done):
                d = done.report.to_dict()
                err.print(f"{name}: " + ", ".join(f"{d[k]} {k}" for k in
                          ("added", "updated", "renamed", "removed"))
                          + f"; {len(done.report.failed)} failed ({done.images} images)",
                          highlight=False)

        def on_failure(failure: Any, name: str = name) -> None:
            err.print(f"{name}: skipped {failure.path}: {failure.error}", highlight=False,
                      markup=False)

        # its own Store object: the server's is refreshed by searches in other threads
        own = Store.open(served.store.path)
        watcher = watch_folder(own, served.collection.embedder, own.root, poll=poll,
                               on_round=on_round, on_error=_print_error(False),
                               on_failure=on_failure)
        watcher.start()
        err.print(f"watching {own.root} for {name}{' (polling)' if poll else ''}",
                  highlight=False)
        watchers.append(watcher)
    return watchers


# ------------------------------------------------------------------------------------------
# bench watch
# ------------------------------------------------------------------------------------------


def bench_watch(
    model: Annotated[str, typer.Option(help="open_clip model name or config JSON")] = (
        "ViT-B-32"
    ),
    pretrained: Annotated[str, typer.Option(help="'none' = random weights")] = "none",
    files: Annotated[int, typer.Option(help="Files written one at a time, each timed.",
                                       min=1)] = 20,
    burst: Annotated[int, typer.Option(help="Files copied in at once.", min=0)] = 5000,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Seconds from a file written to it found by a search (p50/p95), against one
    incremental pass; a burst copied in: its commits, and its time against `vqret index`."""
    with clean_errors():
        from vqret.benchmarks.watch import run_watch_benchmark

        result = run_watch_benchmark(model=model, pretrained=pretrained, files=files,
                                     burst=burst, device=device,
                                     log=None if as_json else err.print)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            out.print(f"{key:>28}  {value}", highlight=False)
