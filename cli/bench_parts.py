"""`vqret bench parts`: what verifying parts costs (size + CRC-32) on reads and writes.

Registered on the `bench` sub-app by `register(bench_app)`, so that cli/main.py needs one line.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from .bench_ann import _ints

out = Console()


def register(bench_app: typer.Typer) -> None:
    """Add `parts` to the `bench` sub-app."""
    bench_app.command("parts")(bench_parts)


def bench_parts(
    n: Annotated[str, typer.Option("--n", help="Rows in the store (100k).")] = "100k",
    dim: Annotated[int, typer.Option("--dim", min=8, help="Vector dimension.")] = 512,
    part_rows: Annotated[str, typer.Option("--part-rows", help="Rows per part.")] = "25k",
    repeats: Annotated[int, typer.Option("--repeats", min=1)] = 5,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Reading a store with its checks (verified, cached) against without, as ratios."""
    from vqret.benchmarks.part_checks import run

    sizes, per_part = _ints(n), _ints(part_rows)
    if len(sizes) != 1 or len(per_part) != 1:
        raise typer.BadParameter("give one size each", param_hint="--n / --part-rows")
    result = run(sizes[0], dim, per_part[0], repeats)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        out.print(f"{key:>16}  {value}", highlight=False)
