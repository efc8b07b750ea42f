"""`vqret bench query`: warm text -> top-10 latency over a large collection.

Registered on the `bench` sub-app by `register(bench_app)`; torch, faiss and numpy are
imported inside the command so that `vqret --help` starts at once.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from .bench_ann import _ints

out = Console()
err = Console(stderr=True)


def register(bench_app: typer.Typer) -> None:
    """Add `query` to the `bench` sub-app."""
    bench_app.command("query")(bench_query)


def bench_query(
    n: Annotated[
        str, typer.Option("--n", help="Collection size: vectors drawn like CLIP embeddings.")
    ] = "1M",
    model: str = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="'none' = random weights")] = "none",
    memory: Annotated[
        str | None, typer.Option("--index-memory", help="Index memory budget, e.g. 4G.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Warm single text queries: encode (torch and ONNX) and search (auto index vs exact)."""
    sizes = _ints(n)
    if len(sizes) != 1:
        raise typer.BadParameter("give one size", param_hint="--n")
    try:
        from vqret.benchmarks.query import run_query_benchmark
        from vqret.retrieval.ann import parse_bytes

        result = run_query_benchmark(
            sizes[0],
            model=model,
            pretrained=pretrained,
            memory=parse_bytes(memory) if memory else None,
            log=None if as_json else err.print,
        )
    except ValueError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            out.print(f"{key:>24}  {value}", highlight=False)
