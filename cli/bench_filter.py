"""`vqret bench filter`: filtered search at each selectivity, recall and latency vs unfiltered.

Registered on the `bench` sub-app by `register(bench_app)`, so that cli/main.py needs one line.
faiss and numpy are imported inside the command so that `vqret --help` starts at once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from vqret.cli.bench_ann import _ints

out = Console(width=None if Console().is_terminal else 140)
err = Console(stderr=True)


def register(bench_app: typer.Typer) -> None:
    """Add `filter` to the `bench` sub-app."""
    bench_app.command("filter")(bench_filter)


def _shares(text: str) -> list[float]:
    """'0.01%,0.1%,1%,0.5' -> [0.0001, 0.001, 0.01, 0.5]."""
    values = []
    for given in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(given[:-1]) / 100 if given.endswith("%") else float(given)
        except ValueError:
            raise typer.BadParameter(f"not a share: {given!r} (try 0.1% or 0.001)") from None
        values.append(value)
    if not values:
        raise typer.BadParameter("give at least one selectivity")
    return values


def bench_filter(
    n: Annotated[str, typer.Option("--n", help="Collection size (100k, 1M).")] = "1M",
    dim: Annotated[int, typer.Option("--dim", min=8, help="Vector dimension.")] = 512,
    selectivities: Annotated[
        str, typer.Option("--selectivities", help="Shares of rows the filters pass.")
    ] = "0.01%,0.1%,1%,10%,50%,100%",
    filters: Annotated[
        str, typer.Option("--filters", help="date (a capture-time window: rows at random) and/"
                          "or subject (rows nearest a random subject: gathered in few lists).")
    ] = "date,subject",
    queries: Annotated[
        int, typer.Option("--queries", min=1, help="Queries (fresh draws, not in the collection).")
    ] = 300,
    kind: Annotated[
        str, typer.Option("--kind", help="Index type as `vqret index --index` takes it.")
    ] = "auto",
    memory: Annotated[
        str | None,
        typer.Option("--memory", help="Memory budget auto plans for, e.g. 1G (default: RAM/4)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="faiss threads for build and truth.")
    ] = None,
    seed: int = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Recall@10 of filtered search against exact filtered search, and its median latency as
    a ratio to the unfiltered query timed beside it, at each selectivity."""
    # before faiss loads its OpenMP runtime (see `vqret bench ann`)
    if "faiss" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from vqret.benchmarks.filter import run_filter_benchmark
    from vqret.retrieval.ann import parse_bytes

    sizes = _ints(n)
    if len(sizes) != 1:
        raise typer.BadParameter("give one collection size", param_hint="--n")
    try:
        report = run_filter_benchmark(
            sizes[0],
            dim=dim,
            selectivities=_shares(selectivities),
            filters=[f.strip() for f in filters.split(",") if f.strip()],
            n_queries=queries,
            kind=kind,
            memory=parse_bytes(memory) if memory else None,
            threads=threads,
            seed=seed,
            log=None if as_json else err.print,
        )
    except ValueError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(_table(report))
    out.print(_summary(report), highlight=False)


def _forced(row: dict[str, Any], route: str) -> str:
    forced = row["forced"].get(route)
    return "-" if forced is None else f"{forced['ratio']:.2f}x / {forced['recall_at_10']:.3f}"


def _table(report: dict[str, Any]) -> Table:
    config, index = report["config"], report["index"]
    table = Table(
        title=f"n = {config['n']:,} x {config['dim']}, {index['factory']} "
              f"({', '.join(f'{k}={v}' for k, v in index['params'].items()) or 'exact'}), "
              f"{config['queries']} queries, 1 thread; ratios to the unfiltered query",
        title_justify="left",
    )
    for name in ("filter", "selectivity", "passing", "route", "recall@10", "ms", "base ms",
                 "ratio", "from ids", "exact forced", "ann forced"):
        table.add_column(name, justify="left" if name in ("filter", "route") else "right")
    for row in report["rows"]:
        param = f" {row['param']}={row['param_median']}" if row["route"] == "ann" else ""
        recall_ok = "" if row["meets_recall"] else " !"
        ratio_ok = "" if row["meets_latency"] else " !"
        table.add_row(
            row["filter"], f"{row['selectivity']:.2%}", f"{row['n_passing']:,}",
            row["route"] + param, f"{row['recall_at_10']:.3f}{recall_ok}",
            f"{row['filtered_ms']:.3f}", f"{row['baseline_ms']:.3f}",
            f"{row['ratio']:.2f}x{ratio_ok}", f"{row['from_ids_ratio']:.2f}x",
            _forced(row, "exact"), _forced(row, "ann"),
        )
    return table


def _summary(report: dict[str, Any]) -> str:
    s = report["summary"]
    verdict = "meets" if s["meets_targets"] else "misses"
    return (
        f"worst recall@10 {s['worst_recall_at_10']:.3f}, worst latency ratio "
        f"{s['worst_ratio']:.2f}x (from raw ids, selector built per query: "
        f"{s['worst_from_ids_ratio']:.2f}x): {verdict} the targets (recall@10 >= 0.95, "
        f">= 0.99 below 1%; <= 2x the unfiltered query)"
    )
