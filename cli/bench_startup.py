"""`vqret bench startup`: cold search, no-op index, info and --help as whole processes,
against `python -c "import numpy"` as the floor (benchmarks/startup.py).

Registered on the `bench` sub-app by `register(bench_app)` (cli/main.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from vqret.cli.errors import clean_errors


def register(bench_app: typer.Typer) -> None:
    """Add `startup` to the `bench` sub-app."""
    bench_app.command("startup")(bench_startup)


def bench_startup(
    workdir: Annotated[
        Path,
        typer.Option(help="Where the two benchmark stores are made, and kept for the next run."),
    ] = Path("bench-startup"),
    rows: Annotated[int, typer.Option(min=1, help="Images in the no-op index's store.")] = 10_000,
    model: Annotated[str, typer.Option(help="Model of the cold search's store.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="'none' = random weights")] = "none",
    search_images: Annotated[
        int, typer.Option("--search-images", min=10, help="Images in the search store.")
    ] = 200,
    repeats: Annotated[int, typer.Option(min=1, help="Timed rounds (medians).")] = 5,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Start-up of each command as a new process, median seconds and x the numpy floor."""
    from rich.console import Console

    out, err = Console(), Console(stderr=True)
    with clean_errors():
        from vqret.benchmarks.startup import run_startup_benchmark

        result = run_startup_benchmark(
            workdir, rows=rows, model=model, pretrained=pretrained,
            search_images=search_images, repeats=repeats,
            log=None if as_json else lambda m: err.print(m, highlight=False),
        )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        out.print(f"{key:>24}  {value}", highlight=False)
