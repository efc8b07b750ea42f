"""`vqret bench video`: a video's moments indexed against decoding every frame.

Registered on the `bench` sub-app by `register(bench_app)`; PyAV and torch are imported
inside the command so that `vqret --help` starts at once.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)


def register(bench_app: typer.Typer) -> None:
    """Add `video` to the `bench` sub-app."""
    bench_app.command("video")(bench_video)


def bench_video(
    seconds: Annotated[float, typer.Option(min=1, help="Length of the video made.")] = 120.0,
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT of the video made.")] = "1920x1080",
    fps: Annotated[int, typer.Option(min=1)] = 30,
    gop: Annotated[float, typer.Option(min=0.04, help="Seconds between keyframes.")] = 1.0,
    every: Annotated[float, typer.Option(min=0.01, help="A sample at least this often (s).")
                     ] = 2.0,
    baseline_seconds: Annotated[
        float, typer.Option("--baseline-seconds", min=1,
                            help="Seconds the naive decode-every-frame loop runs on "
                            "(extrapolated per video-second).")
    ] = 20.0,
    model: str = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="'none' = random weights")] = "none",
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16")] = "auto",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Index a made-up H.264 video (1080p by default): x real time and frames embedded per
    second, against a naive loop decoding every frame, in the same run."""
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise typer.BadParameter("give WIDTHxHEIGHT, e.g. 1920x1080", param_hint="--size"
                                 ) from None
    from vqret.benchmarks.video import run_video_benchmark

    result = run_video_benchmark(
        seconds, fps=fps, width=width, height=height, gop=gop, every=every,
        baseline_seconds=baseline_seconds, model=model, pretrained=pretrained,
        precision=precision, log=None if as_json else err.print,
    )
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            out.print(f"{key:>32}  {value}", highlight=False)
