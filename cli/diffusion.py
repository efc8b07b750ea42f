"""`vqret diffusion train|presets`, `vqret generate`, `vqret bench diffusion`: thin wrappers
over vqret.diffusion. (`vqret search`'s fallback runs in the query engine: cli/search.py.)

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

diffusion_app = typer.Typer(
    help="DiT fallback: synthesize images from CLIP embeddings when retrieval finds nothing.",
    no_args_is_help=True,
)

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="Store folder (default: found from here upwards)."),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", help="Diffusion checkpoint folder (default: STORE/diffusion)."),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option("--tokenizer", help="Tokenizer checkpoint (default: the store's)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")]


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `vqret diffusion ...` and `vqret generate` to `app`, `vqret bench diffusion` to
    `bench_app`."""
    app.add_typer(diffusion_app, name="diffusion")
    app.command("generate")(generate_command)
    bench_app.command("diffusion")(bench_diffusion)


def _say(line: str) -> None:
    err.print(line, highlight=False, soft_wrap=True, markup=False)


# ------------------------------------------------------------------------------------------
# diffusion train / presets
# ------------------------------------------------------------------------------------------


@diffusion_app.command("train")
def train_command(
    store: StoreOpt = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Checkpoint folder (default: STORE/diffusion)."),
    ] = None,
    tokenizer: TokenizerOpt = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="tiny | cpu | gpu-s | gpu-b (default: cpu, or the checkpoint's when resuming)"
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Total optimizer steps.")] = None,
    minutes: Annotated[
        float | None, typer.Option(min=0.01, help="Total training minutes (resumes included).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW, 100 warm-up steps).")] = 3e-4,
    seed: int = 0,
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config field, e.g. depth=8.")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train the DiT on the store's image embeddings and tokenizer latents; resumable."""
    if steps is None and minutes is None:
        fail("give a budget: --minutes N and/or --steps N")
    with clean_errors(KEPT_CHECKPOINT):
        from vqret.diffusion.train import train

        result = train(
            store, out_dir, tokenizer=tokenizer, preset=preset, steps=steps, minutes=minutes,
            batch_size=batch_size, lr=lr, seed=seed, device=device, threads=threads,
            resume=not fresh, progress=not (as_json or quiet) and err.is_terminal,
            log_fn=None if (quiet or as_json) else _say, **parse_overrides(set_ or [], "depth=8"),
        )
    if as_json:
        print(json.dumps(result.to_dict()))
    elif not quiet:
        loss = "-" if result.loss is None else f"{result.loss:.4f}"
        out.print(f"step {result.step} ({result.train_seconds / 60:.1f} min), loss {loss}, "
                  f"{result.images} images -> {result.out}", highlight=False)


@diffusion_app.command("presets")
def presets_command(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The built-in DiT presets."""
    from vqret.diffusion.config import PRESETS

    rows = {name: {k: getattr(c, k) for k in ("patch_size", "hidden_size", "depth", "num_heads")}
            for name, c in sorted(PRESETS.items())}
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for name, r in rows.items():
        out.print(f"{name:>6}  patch {r['patch_size']}, width {r['hidden_size']}, depth "
                  f"{r['depth']}, {r['num_heads']} heads", highlight=False)


# ------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------


def generate_command(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[
        Path, typer.Option("--out", "-o", help="PNG to write (out.png, out-1.png, ...).")
    ],
    n: Annotated[int, typer.Option("--n", "-n", min=1, max=64, help="Images.")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="Sampler steps (model calls).")] = 50,
    guidance: Annotated[
        float, typer.Option(min=0.0, help="Classifier-free guidance (1: none, 0: uncond.)")
    ] = 3.0,
    seed: Annotated[int, typer.Option(help="Image i starts from the noise of seed + i.")] = 0,
    prior_k: Annotated[
        int, typer.Option("--prior-k", min=1, help="Top-k image embeddings in the prior.")
    ] = 8,
    prior_blend: Annotated[
        float,
        typer.Option("--prior-blend", min=0.0, max=1.0,
                     help="Weight of the text embedding vs the retrieved images' mean."),
    ] = 0.5,
    solver: Annotated[str, typer.Option(help="euler | heun")] = "euler",
    store: StoreOpt = None,
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Draw images for PROMPT with the store's diffusion model; print each CLIP score."""
    if not prompt.strip():
        fail("empty prompt: give some text to draw")
    with clean_errors(KEPT_CHECKPOINT):
        from vqret.diffusion.generate import Generator, output_paths

        output_paths(output, n)  # bad options fail before any model is loaded
        if solver not in ("euler", "heun"):
            raise ValueError(f"--solver must be euler or heun, got {solver!r}")
        generator = Generator.load(store, model=model, tokenizer=tokenizer, device=device)
        images = generator.generate(prompt, n=n, steps=steps, guidance=guidance, seed=seed,
                                    prior_k=prior_k, prior_blend=prior_blend, solver=solver)
        paths = images.save(output)
    rows = images.to_dicts(paths)
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        out.print(f"{row['path']}  CLIP score {row['clip_score']:.4f}  (seed {row['seed']})",
                  highlight=False)


# ------------------------------------------------------------------------------------------
# bench diffusion
# ------------------------------------------------------------------------------------------


def bench_diffusion(
    store: StoreOpt = None,
    model: ModelOpt = None,
    tokenizer: TokenizerOpt = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Text file of prompts, one a line (default: the store's captions)."),
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images per prompt.")] = 4,
    guidance: Annotated[str, typer.Option(help="Comma-separated guidance scales.")] = "0,1,2,3,5",
    steps: Annotated[int, typer.Option(min=1, help="Steps for the guidance sweep.")] = 25,
    limit: Annotated[int, typer.Option(min=1, help="At most this many prompts.")] = 24,
    plot: Annotated[Path | None, typer.Option(help="Write the guidance plot here (PNG).")] = None,
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Samples/s at 25 and 50 steps; prompt-match accuracy and CLIP score vs guidance."""
    with clean_errors(KEPT_CHECKPOINT):
        from vqret.benchmarks.diffusion import run_diffusion_benchmark

        scales = [float(v) for v in guidance.split(",") if v.strip()]
        result = run_diffusion_benchmark(
            store, model=model, tokenizer=tokenizer, prompts_file=prompts, n=n,
            guidance=scales, steps=steps, limit=limit, plot=plot, device=device,
            threads=threads, log=None if as_json else _say,
        )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        out.print(f"{key:>24}  {value}", highlight=False)
