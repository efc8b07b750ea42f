"""`vqret tokenizer ...` and `vqret bench tokenizer`: thin wrappers over vqret.tokenizer.

Wired into the main app by `register(app, bench_app)` (cli/main.py). Heavy imports (torch)
happen inside the commands so that `vqret --help` stays instant.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

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


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def _clean_errors():
    """Known failures become one line on stderr and exit status 1, never a traceback."""
    from vqret.retrieval.images import ImageLoadError

    try:
        yield
    except (ValueError, ImageLoadError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        err.print("interrupted: the last checkpoint is kept; run the same command to resume")
        raise typer.Exit(130) from None


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. codebook_size=512), got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value  # a bare string, e.g. quantizer=fsq
    return overrides


# ------------------------------------------------------------------------------------------
# tokenizer train
# ------------------------------------------------------------------------------------------


@tokenizer_app.command("train")
def train_command(
    images: Annotated[
        Path, typer.Option("--images", help="Folder of images to train on (walked recursively).")
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Checkpoint folder [default: ./tokenizer-PRESET]."),
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
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | bf16 | fp32")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Augmentation worker processes.")] = 0,
    cache: Annotated[
        bool | None,
        typer.Option(
            "--cache/--no-cache",
            help="Keep decoded images in memory [default: when they fit in 8 GiB].",
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
    """Train a tokenizer on --images; run it again to resume from its last checkpoint."""
    if steps is None and minutes is None:
        _fail("give a budget: --minutes N and/or --steps N")
    if not images.is_dir():
        _fail(f"{images}: not a folder")
    with _clean_errors():
        from vqret.tokenizer.train import train

        overrides = _parse_overrides(set_ or [])
        target = out_dir or Path(f"tokenizer-{Path(preset).stem}")
        show_bar = not (as_json or quiet) and err.is_terminal
        result = train(
            images,
            target,
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
    with _clean_errors():
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
