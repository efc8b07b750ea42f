"""`vqret`: index a folder of images, search it by text or by image.

The CLI is thin: every command calls the Python API (vqret.retrieval). Heavy imports (torch,
open_clip, faiss) happen inside the commands so that `vqret --help` starts at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from vqret.cli.errors import clean_errors, fail

app = typer.Typer(
    help="Cross-modal image retrieval: index a folder with open_clip + FAISS, search it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks (speed, ...); results as ratios to a same-run baseline.")
app.add_typer(bench_app, name="bench")

out = Console()
err = Console(stderr=True)

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Store folder (default: FOLDER/.vqret, or found upwards)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")]


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    import logging

    # open_clip logs routine notes (e.g. random init) as root warnings: keep them out of the way.
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(message)s")
    from vqret.retrieval.lazy_import import skip_pyarrow_pandas_probe

    # pyarrow imports pandas (0.5 s) the first time it builds or converts an array, to ask
    # whether the input is a pandas object: never one in our commands (docs/startup.md)
    skip_pyarrow_pandas_probe()


# ------------------------------------------------------------------------------------------
# index
# ------------------------------------------------------------------------------------------


@app.command()
def index(
    folder: Annotated[
        str,
        typer.Argument(
            help="Folder of images to index (recursively), or an fsspec URL "
            "(s3://bucket/prefix, gs://..., file://...) with --store LOCAL_DIR."
        ),
    ],
    store: StoreOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="open_clip model name, or path of a model-config JSON "
            "(default: ViT-B-32, or the store's model)"
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Pretrained tag (HF cache), or a local .safetensors/.pt file "
            "(default: laion2b_s34b_b79k, or the store's weights)"
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(help="auto (bf16 on CPUs that have it, fp16 on CUDA) | fp32 | bf16 | fp16"),
    ] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Decode processes (default: 1 per 8 CPU cores; up to 8 with CUDA); with "
            "--engine ray, model actors (default: 1 per GPU, else 1 per CPU)."
        ),
    ] = None,
    rebuild: Annotated[bool, typer.Option(help="Discard the store and start over.")] = False,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for another writer of the store.")
    ] = 0.0,
    index_type: Annotated[
        str | None,
        typer.Option(
            "--index",
            help="auto | flat | hnsw | ivf | ivfpq (default: auto, or the store's last choice)",
        ),
    ] = None,
    index_memory: Annotated[
        str | None,
        typer.Option(
            "--index-memory", help="Memory budget of the index, e.g. 4G (default: RAM/4)."
        ),
    ] = None,
    commit_every: Annotated[
        int | None,
        typer.Option(
            "--commit-every",
            min=1,
            help="Commit after this many new images, or 30 s (default: 512; with --engine ray "
            "65536: a cluster embeds thousands a second).",
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="local | ray: embed in this process, or on a Ray cluster.")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="--engine ray: the cluster, auto or ray://HOST:PORT (default: a local Ray)."
        ),
    ] = None,
    video_every: Annotated[
        float, typer.Option("--video-every", min=0.01,
                            help="Videos: a frame at least every this many seconds, and at "
                            "scene changes.")
    ] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no summary.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Then keep the store in step as files change "
                           "(vqret watch).")
    ] = False,
    poll: Annotated[bool, typer.Option("--poll", help="--watch by polling (network mounts).")] = (
        False
    ),
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Read again the files that failed to decode "
                           "and haven't changed since (skipped otherwise).")
    ] = False,
) -> None:
    """Embed every image and video under FOLDER; again, it touches only what changed."""
    with clean_errors():
        from vqret.api import Collection

        if watch and engine != "local":
            fail("--watch indexes with --engine local")
        if engine not in ("local", "ray"):
            fail(f"unknown engine {engine!r}: use local or ray")
        if address is not None and engine != "ray":
            fail("--address is for --engine ray")
        if engine == "ray":
            from vqret.retrieval.distributed import RayUnavailableError, require_ray

            try:
                require_ray()  # before loading any model: the install hint, in one line
            except RayUnavailableError as e:
                fail(str(e))
        from vqret.retrieval.urls import is_url

        if not is_url(folder) and not Path(folder).is_dir():
            fail(f"{folder}: not a folder")
        if watch and is_url(folder):
            fail(f"{folder}: --watch watches a local folder")
        collection = Collection.create(
            folder,
            store,
            model=model,
            pretrained=pretrained,
            rebuild=rebuild,
            device=device,
            precision=precision,
            batch_size=batch_size,
            num_workers=workers,
        )
        show_progress = not (as_json or quiet) and err.is_terminal
        from vqret.retrieval.ann import parse_bytes

        options = {
            "wait": wait,
            "index_kind": index_type,
            "index_memory": parse_bytes(index_memory) if index_memory else None,
            "video_every": video_every,
            "retry_failed": retry_failed,
        }
        if engine == "ray":
            from vqret.retrieval.distributed import RayEmbedder, indexer_options

            # Same store, same Indexer; only the images go through the model on Ray. The
            # local model already loaded embeds sidecar captions (few, cheap).
            ray_embedder = RayEmbedder(
                collection.store.spec,
                address=address,
                num_workers=workers,
                batch_size=batch_size,
                device=device,
                precision=precision,
                text_embedder=collection.embedder,
            )
            collection = Collection(collection.store, ray_embedder)
            options.update(indexer_options(ray_embedder))
        if commit_every is not None:
            options["commit_every"] = commit_every
        ray_run: dict = {}
        try:
            report = _run_index(collection, folder, options, show_progress, quiet)
        finally:
            if engine == "ray":
                ray_run = _ray_summary(ray_embedder.last_run)
                ray_embedder.close()
        # Once per model: text searches then start without torch (retrieval/onnx_text.py).
        text_status = collection.prepare_fast_text_search(raise_io_errors=True)
    if not (as_json or quiet) and text_status.startswith("exported"):
        err.print(f"text encoder {text_status} (ONNX): text searches start without torch",
                  highlight=False)
    if as_json:
        print(json.dumps(report.to_dict() | ({"ray": ray_run} if ray_run else {})))
    elif not quiet:
        _print_summary(report, collection)
        if ray_run:
            out.print(
                f"on Ray: {ray_run['actors']} actor(s) x {ray_run['num_cpus']:g} CPU"
                + (f" + {ray_run['num_gpus']} GPU" if ray_run["num_gpus"] else "")
                + (f", {ray_run['images_per_actor_second']} images/s per actor"
                   if ray_run.get("images_per_actor_second") else ""),
                highlight=False,
            )
    if watch:
        from vqret.cli.watch import keep_watching

        # a file that fails again after an event has changed: retried without the flag
        options["retry_failed"] = False
        keep_watching(collection, folder, options, poll=poll, as_json=as_json, quiet=quiet,
                      first_pass=False, run_index=_run_index, print_summary=_print_summary)


def _video_rows(store) -> int:
    column = store.read_table(["video_id"]).column("video_id")
    return len(column) - column.null_count


def _ray_summary(last_run: dict) -> dict:
    """What the Ray engine used for the images it embedded (nothing when none went)."""
    if not last_run:
        return {}
    summary = {k: last_run[k] for k in ("actors", "num_cpus", "num_gpus", "device", "images")}
    busy = last_run.get("worker_seconds") or 0.0
    # one actor's rate, from the actors' busy time: what the 100M arithmetic needs
    summary["images_per_actor_second"] = round(last_run["images"] / busy, 2) if busy else None
    return summary


def _run_index(collection, folder: str, options: dict, show_progress: bool, quiet: bool):
    def on_failure(failure) -> None:
        if not quiet:
            err.print(f"skipped {failure.path}: {failure.error}", highlight=False, markup=False)

    if not show_progress:
        return collection.index(folder, on_failure=on_failure, **options)
    from vqret.cli.progress import index_progress

    with index_progress("embedding", err) as (on_progress, on_video_frames):
        return collection.index(folder, on_failure=on_failure, on_progress=on_progress,
                                on_video_frames=on_video_frames, **options)


def _print_summary(report, collection) -> None:
    d = report.to_dict()
    parts = [f"{d[k]} {k}" for k in ("added", "updated", "renamed", "removed", "unchanged")]
    if report.repaired:  # rows of damaged parts, re-embedded under their ids
        parts.insert(0, f"{report.repaired} repaired")
    if report.embedded:
        work = f"{report.embedded} embedded, {report.embedded / report.seconds:.1f} images/s"
    elif len(report.failed) > report.failed_before:
        work = "0 embedded"
    else:  # the model was never loaded (retrieval/deferred_embedder.py)
        work = f"nothing to embed (scan {report.seconds:.2f} s)"
    failed = f"{len(report.failed)} failed"
    if report.failed_before:  # not read again (retrieval/store_layout.py: Failure)
        failed += (f" ({report.failed_before} unchanged since they failed to decode: "
                   "--retry-failed reads them again)")
    videos = report.videos
    rows = len(collection.store)
    moments = _video_rows(collection.store) if videos and any(
        videos[k] for k in ("added", "updated", "renamed", "unchanged")) else 0
    held = f"{rows - moments} images" + (f", {moments} video moments" if moments else "")
    out.print(
        f"{', '.join(parts)}; {work}; {failed} "
        f"-> {collection.store.path} ({held}, {report.seconds:.1f} s)",
        highlight=False,
    )
    if videos and any(videos[k] for k in ("added", "updated", "renamed", "removed")):
        out.print(f"videos: {videos['added']} added, {videos['updated']} updated, "
                  f"{videos['renamed']} renamed, {videos['removed']} removed; "
                  f"{videos['embedded_frames']} frames embedded into {videos['segments']} "
                  "moments", highlight=False)


@app.command("index-texts")
def index_texts(
    file: Annotated[Path, typer.Argument(help="CSV or JSONL: text (or caption), optional image.")],
    store: StoreOpt = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Add texts (captions) to the store's text index; again, it updates that file's rows."""
    with clean_errors():
        from vqret.api import Collection

        report = Collection.open(store, device=device).index_texts(file)
    if as_json:
        print(json.dumps(report))
    else:
        out.print(f"{report['added']} added, {report['removed']} removed, "
                  f"{report['unchanged']} unchanged texts from {file}", highlight=False)


# ------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------


@app.command()
def info(
    store: StoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What a store holds: model, counts, and the files that failed last run."""
    with clean_errors():
        from vqret.api import Collection

        facts = Collection.open(store).info()
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if key == "metadata":  # each column's coverage, as a share of the rows
            out.print(f"[bold]{key:>15}[/]")
            for name, fact in value.items():
                if isinstance(fact, dict):
                    fact = ", ".join(f"{k} {n}" for k, n in fact.items()) or "none"
                elif name != "folders" and facts["images"]:
                    fact = f"{fact} ({100 * fact / facts['images']:.0f}%)"
                out.print(f"{name:>19}  {fact}", highlight=False, markup=False)
        elif isinstance(value, dict):  # index, codes
            out.print(f"[bold]{key:>15}[/]")
            for name, fact in value.items():
                out.print(f"{name:>19}  {fact}", highlight=False, markup=False)
        elif key not in ("failures", "damaged"):
            out.print(f"[bold]{key:>15}[/]  {value}", highlight=False)
    for d in facts["damaged"]:  # one line a part: what is wrong, what it costs, the fix
        rows = f"{d['rows']} rows" if d["rows"] is not None else "its rows"
        out.print(f"{'damaged':>15}  {d['table']}/{d['part']}: {d['cause']}; {rows} "
                  "unavailable until `vqret index` repairs it", highlight=False, markup=False,
                  soft_wrap=True)
    failures = facts["failures"]
    out.print(f"[bold]{'failures':>15}[/]  {len(failures)}")
    for f in failures:
        out.print(f"                 {f['path']}: {f['error']}", highlight=False, markup=False)


# ------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------


@bench_app.command("speed")
def bench_speed(
    images: Annotated[Path, typer.Argument(help="Folder of images to embed.")],
    model: str = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="'none' = random weights")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    limit: Annotated[int, typer.Option(help="Use at most this many images.")] = 512,
    device: DeviceOpt = "cpu",
    workers: int | None = None,
    precision: Annotated[
        str, typer.Option(help="vqret's precision: auto | fp32 | bf16 | fp16 (the loop is fp32)")
    ] = "auto",
    upscale: Annotated[
        float | None,
        typer.Option(help="Time JPEG copies enlarged to this many megapixels (e.g. 12)."),
    ] = None,
    cold_repeats: Annotated[
        int,
        typer.Option("--cold-repeats", min=0,
                     help="Also time a cold `vqret search`, ONNX vs torch, this many runs each."),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Indexing images/s next to a plain open_clip loop, share of the matmul roof; text query
    latency."""
    with clean_errors():
        from vqret.benchmarks.speed import run_speed_benchmark

        result = run_speed_benchmark(
            images,
            model=model,
            pretrained=pretrained,
            batch_size=batch_size,
            limit=limit,
            device=device,
            workers=workers,
            precision=precision,
            upscale_megapixels=upscale,
            cold_repeats=cold_repeats,
            log=None if as_json else err.print,
        )
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            out.print(f"{key:>28}  {value}", highlight=False)


from vqret.cli.search import register as _register_search  # noqa: E402

_register_search(app)

from vqret.cli.serve import register as _register_serve  # noqa: E402

_register_serve(app)

from vqret.cli.tokenizer import register as _register_tokenizer  # noqa: E402

_register_tokenizer(app, bench_app)

from vqret.cli.diffusion import register as _register_diffusion  # noqa: E402

_register_diffusion(app, bench_app)

from vqret.cli.dupes import register as _register_dupes  # noqa: E402

_register_dupes(app)

from vqret.cli.bench_ann import register as _register_bench_ann  # noqa: E402

_register_bench_ann(bench_app)

from vqret.cli.bench_query import register as _register_bench_query  # noqa: E402

_register_bench_query(bench_app)

from vqret.cli.bench_ray import register as _register_bench_ray  # noqa: E402

_register_bench_ray(bench_app)

from vqret.cli.bench_filter import register as _register_bench_filter  # noqa: E402

_register_bench_filter(bench_app)

from vqret.cli.bench_parts import register as _register_bench_parts  # noqa: E402

_register_bench_parts(bench_app)

from vqret.cli.watch import register as _register_watch  # noqa: E402

_register_watch(app, _run_index, _print_summary)

from vqret.cli.bench_video import register as _register_bench_video  # noqa: E402

_register_bench_video(bench_app)

from vqret.cli.bench_startup import register as _register_bench_startup  # noqa: E402

_register_bench_startup(bench_app)


@bench_app.command("recall")
def bench_recall(
    captions: Annotated[Path, typer.Option(help="COCO captions_*.json, Karpathy dataset_*.json, "
                                                "or CSV/JSONL of image,caption rows.")],
    images: Annotated[Path, typer.Option(help="Folder the caption file's image paths are in.")],
    model: str = "ViT-B-32",
    pretrained: str = "laion2b_s34b_b79k",
    k: Annotated[str, typer.Option("--k", help="Comma-separated k values.")] = "1,5,10",
    split: Annotated[str | None, typer.Option(help="Karpathy split, e.g. test.")] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 (AMP)")] = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 64,
    index_type: Annotated[
        str | None, typer.Option("--index", help="Also through this ANN index: hnsw|ivf|...")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """text->image and image->text recall@k, defined exactly as CLIP_benchmark."""
    with clean_errors():
        from vqret.benchmarks.recall import run_recall_benchmark

        ks = [int(v) for v in k.split(",") if v.strip()]
        result = run_recall_benchmark(
            captions, images, model=model, pretrained=pretrained, ks=ks, split=split,
            device=device, precision=precision, batch_size=batch_size, index=index_type,
            log=None if as_json else err.print,
        )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{result['model']} ({result['pretrained']}), {result['images']} images, "
                        f"{result['captions']} captions, {result['precision']}")
    table.add_column("metric")
    table.add_column("exact", justify="right")
    if "ann" in result:
        table.add_column(f"index: {result['index']}", justify="right")
    for name, value in result["exact"].items():
        row = [name, f"{value:.2f}"]
        if "ann" in result:
            row.append(f"{result['ann'][name]:.2f}")
        table.add_row(*row)
    out.print(table)


def main() -> None:  # pragma: no cover - console entry
    only_the_command_asked_for(app, sys.argv[1:])()


def only_the_command_asked_for(group: typer.Typer, args: list[str]) -> typer.Typer:
    """`group` with only the (sub)command that `args` name, when they name one.

    Typer turns every command's signature into options, and builds a pydantic adapter for
    each, before it runs any: ~80 ms of a cold search for 30 commands it won't run
    (docs/startup.md). `--help` alone, or a name that matches nothing, gets the whole group,
    so that typer lists every command or suggests the closest one."""
    import copy

    from typer.main import get_command_name

    name = next((arg for arg in args if not arg.startswith("-")), None)
    if name is None:
        return group
    commands = [c for c in group.registered_commands
                if (c.name or get_command_name(c.callback.__name__)) == name]
    groups = [g for g in group.registered_groups if g.name == name]
    if not commands and not groups:
        return group
    pruned = copy.copy(group)
    pruned.registered_commands = commands
    pruned.registered_groups = []
    for info in groups:
        info = copy.copy(info)
        info.typer_instance = only_the_command_asked_for(
            info.typer_instance, args[args.index(name) + 1:])
        pruned.registered_groups.append(info)
    return pruned


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
