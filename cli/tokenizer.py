"""`vqret tokenizer ...` and `vqret bench tokenizer`: thin wrappers over vqret.tokenizer.

Wired into the main app by `register(app, bench_app)` (cli/main.py). Heavy imports (torch)
happen inside the commands so that `vqret --help` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from vqret.cli.errors import KEPT_CHECKPOINT, clean_errors, fail
from vqret.cli.options import parse_overrides

out = Console()
err = Console(stderr=True)

tokenizer_app = typer.Typer(
    help="VQ-VAE tokenizer: discrete code grids for images, and images back from codes.",
    no_args_is_help=True,
)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `vqret tokenizer ...` to `app` and `vqret bench tokenizer` to `bench_app`."""
    app.add_typer(tokenizer_app, name="tokenizer")
    bench_app.command("tokenizer")(bench_tokenizer)


# ------------------------------------------------------------------------------------------
# tokenizer train
# ------------------------------------------------------------------------------------------


StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Store folder (or its indexed folder); default: the one found from here up.",
    ),
]


def open_store(store: Path | None):
    """A store by path (the store folder or the folder it indexes), or the nearest one up."""
    from vqret.retrieval.store import Store

    return Store.open(store)


@tokenizer_app.command("train")
def train_command(
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Folder of images to train on (walked recursively); default: the --store's "
            "images.",
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            help="Train on this store's images (without --images: the store found upwards); "
            "the checkpoint goes to STORE/tokenizer, where encode, decode and dupes look.",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Checkpoint folder (default: STORE/tokenizer with a store, else "
            "./tokenizer-PRESET).",
        ),
    ] = None,
    preset: Annotated[
        str, typer.Option(help="Preset name (tiny, cpu, cpu-fsq, gpu, ...) or config JSON.")
    ] = "cpu",
    steps: Annotated[int | None, typer.Option(min=1, help="Total optimizer steps.")] = None,
    minutes: Annotated[
        float | None, typer.Option(min=0.01, help="Total training minutes (resumes included).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (Adam).")] = 1e-3,
    holdout: Annotated[float, typer.Option(help="Fraction of files held out and measured.")] = 0.05,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | bf16 | fp32")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Augmentation worker processes.")] = 0,
    cache: Annotated[
        bool | None,
        typer.Option(
            "--cache/--no-cache",
            help="Keep decoded images in memory (default: when they fit in 8 GiB).",
        ),
    ] = None,
    seed: int = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field, e.g. --set codebook_size=512."),
    ] = None,
    fresh: Annotated[
        bool, typer.Option(help="Start over instead of resuming from --out's checkpoint.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = (
        False
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no log.")] = False,
) -> None:
    """Train a tokenizer on --images or a store's images; run it again to resume."""
    if steps is None and minutes is None:
        fail("give a budget: --minutes N and/or --steps N")
    if images is not None and store is not None:
        fail("give --images DIR or --store PATH, not both")
    if images is not None and not images.is_dir():
        fail(f"{images}: not a folder")
    with clean_errors(KEPT_CHECKPOINT):
        from vqret.tokenizer.store_codes import TOKENIZER_DIRNAME
        from vqret.tokenizer.train import train

        overrides = parse_overrides(set_ or [], "codebook_size=512")
        root = None
        if images is not None:
            source = images
            target = out_dir or Path(f"tokenizer-{Path(preset).stem}")
        else:
            opened = open_store(store)
            root = opened.root
            source = [str(root / p) for p in opened.read_table(["path"]).column("path").to_pylist()]
            if not source:
                fail(f"{opened.path} has no images: run `vqret index FOLDER` first")
            target = out_dir or opened.path / TOKENIZER_DIRNAME
        show_bar = not (as_json or quiet) and err.is_terminal
        result = train(
            source,
            target,
            root=root,
            preset=preset,
            steps=steps,
            minutes=minutes,
            batch_size=batch_size,
            lr=lr,
            holdout=holdout,
            seed=seed,
            device=device,
            precision=precision,
            threads=threads,
            workers=workers,
            cache=cache,
            resume=not fresh,
            progress=show_bar,
            log_fn=None
            if quiet
            else (lambda line: err.print(line, highlight=False, soft_wrap=True)),
            **overrides,
        )
    if as_json:
        print(json.dumps(result.to_dict()))
    elif not quiet:
        m = result.metrics
        held = (
            f"; held-out PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, codebook usage "
            f"{m['codebook_usage']:.1%}, perplexity {m['perplexity']:.0f}"
            if m
            else ""
        )
        out.print(
            f"step {result.step} ({result.train_seconds / 60:.1f} min){held} -> {result.out}",
            highlight=False,
        )


@tokenizer_app.command("presets")
def presets_command(
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The built-in tokenizer presets and their main sizes."""
    from vqret.tokenizer.config import PRESETS

    rows = {
        name: {
            "image_size": c.image_size,
            "grid_size": c.grid_size,
            "quantizer": c.quantizer,
            "num_codes": c.num_codes,
        }
        for name, c in sorted(PRESETS.items())
    }
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for name, r in rows.items():
        out.print(
            f"{name:>10}  {r['image_size']}px -> {r['grid_size']}x{r['grid_size']} grid, "
            f"{r['quantizer']}, {r['num_codes']} codes",
            highlight=False,
        )


# ------------------------------------------------------------------------------------------
# tokenizer encode / decode: code grids in the store
# ------------------------------------------------------------------------------------------

TokenizerOpt = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        "-t",
        help="Checkpoint folder or .safetensors (default: the one the store's codes were made "
        "with, else STORE/tokenizer).",
    ),
]


def _load_tokenizer(store, checkpoint: Path | None, device: str, batch_size: int = 64):
    from vqret.tokenizer.api import Tokenizer
    from vqret.tokenizer.store_codes import store_tokenizer_path

    return Tokenizer.load(
        store_tokenizer_path(store, checkpoint), device=device, batch_size=batch_size
    )


@tokenizer_app.command("encode")
def encode_command(
    store: StoreOpt = None,
    checkpoint: TokenizerOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for another writer of the store.")
    ] = 0.0,
    commit_every: Annotated[
        int,
        typer.Option("--commit-every", min=1, help="Commit after this many encoded images "
                     "(and every 30 s)."),
    ] = 65536,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help='One JSON object: {"tokenizer", "grid", "encoded", "skipped", '
            '"failed": [{"path", "error"}], "seconds"}.'
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no summary.")] = False,
) -> None:
    """Write every image's code grid into the store; again, it encodes only what's new."""
    with clean_errors(KEPT_CHECKPOINT):
        from vqret.tokenizer.store_codes import pending_codes

        opened = open_store(store)
        # every row has its codes: said without importing torch or loading the tokenizer
        report = pending_codes(opened, checkpoint)
        if report is None:
            report = _encode(opened, checkpoint, device, batch_size, threads, wait,
                             commit_every, as_json, quiet)
    if as_json:
        print(json.dumps(report.to_dict()))
    elif not quiet:
        g = report.grid
        out.print(
            f"{report.encoded} encoded, {report.skipped} skipped (already encoded), "
            f"{len(report.failed)} failed; {g[0]}x{g[1]} codes by tokenizer "
            f"{report.tokenizer[:12]} -> {opened.path} ({report.seconds:.1f} s)",
            highlight=False,
        )


def _encode(opened, checkpoint, device: str, batch_size: int, threads: int | None, wait: float,
            commit_every: int, as_json: bool, quiet: bool):
    """The encode run itself, once some row needs codes."""
    import torch
    from vqret.tokenizer.store_codes import encode_store

    if threads is not None:
        torch.set_num_threads(threads)
    tokenizer = _load_tokenizer(opened, checkpoint, device, batch_size)

    def on_failure(failure) -> None:
        if not quiet:
            err.print(f"skipped {failure.path}: {failure.error}", highlight=False,
                      markup=False)

    show_bar = not (as_json or quiet) and err.is_terminal
    options = {"wait": wait, "commit_every": commit_every, "on_failure": on_failure}
    try:
        if show_bar:
            report = _encode_with_progress(opened, tokenizer, options)
        else:
            report = encode_store(opened, tokenizer, **options)
    except KeyboardInterrupt:
        err.print("interrupted: committed codes are kept; run the same command to resume")
        raise typer.Exit(130) from None
    return report


def _encode_with_progress(store, tokenizer, options: dict):
    from vqret.cli.progress import images_progress
    from vqret.tokenizer.store_codes import encode_store

    with images_progress("encoding", err) as on_progress:
        return encode_store(store, tokenizer, on_progress=on_progress, **options)


@tokenizer_app.command("decode")
def decode_command(
    output: Annotated[Path, typer.Option("--out", "-o", help="Picture to write (PNG, JPEG...).")],
    row_id: Annotated[int | None, typer.Option("--id", help="The image's row id.")] = None,
    path: Annotated[
        Path | None,
        typer.Option("--path", help="The image's path: as stored, or a file under the folder."),
    ] = None,
    store: StoreOpt = None,
    checkpoint: TokenizerOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "cpu",
) -> None:
    """Rebuild an image from its stored codes (no pixels read): --id N or --path P."""
    if (row_id is None) == (path is None):
        fail("give --id N or --path P (one of them)")
    with clean_errors(KEPT_CHECKPOINT):
        from PIL import Image
        from vqret.retrieval.atomic import atomic_write
        from vqret.tokenizer.store_codes import decode_row

        opened = open_store(store)
        tokenizer = _load_tokenizer(opened, checkpoint, device)
        pixels = decode_row(opened, tokenizer, id=row_id, path=path)
        import io

        fmt = Image.registered_extensions().get(output.suffix.lower())
        if fmt is None:
            fail(f"{output}: unknown picture type {output.suffix!r} (try .png)")
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format=fmt)
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(output, buffer.getvalue())
    err.print(f"wrote {output} ({pixels.shape[1]}x{pixels.shape[0]})", highlight=False)


# ------------------------------------------------------------------------------------------
# bench tokenizer
# ------------------------------------------------------------------------------------------


def bench_tokenizer(
    images: Annotated[Path, typer.Option("--images", help="Held-out folder of images.")],
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", "-c", help="Tokenizer checkpoint folder or file.")
    ],
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many images.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """PSNR, SSIM, codebook usage, perplexity and bytes per image on a held-out folder."""
    with clean_errors(KEPT_CHECKPOINT):
        from vqret.benchmarks.tokenizer import run_tokenizer_benchmark

        result = run_tokenizer_benchmark(
            checkpoint,
            images,
            limit=limit,
            batch_size=batch_size,
            device=device,
            threads=threads,
            log=None
            if as_json
            else (lambda line: err.print(line, highlight=False, soft_wrap=True)),
        )
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            out.print(f"{key:>26}  {value}", highlight=False)
