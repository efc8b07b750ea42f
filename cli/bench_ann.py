"""`vqret bench ann`: every index type against exact search on clustered CLIP-like vectors.

Registered on the `bench` sub-app by `register(bench_app)`, so that cli/main.py needs one line.
faiss and numpy are imported inside the command so that `vqret --help` starts at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

# Wide enough for the table when piped to a file (rich falls back to 80 columns there).
out = Console(width=None if Console().is_terminal else 120)
err = Console(stderr=True)


def register(bench_app: typer.Typer) -> None:
    """Add `ann` to the `bench` sub-app."""
    bench_app.command("ann")(bench_ann)


def _ints(text: str) -> list[int]:
    """'10000,1e5,1M' -> [10000, 100000, 1000000]."""
    scale = {"K": 1_000, "M": 1_000_000}
    values = []
    for given in filter(None, (p.strip() for p in text.split(","))):
        part = given.upper()
        try:
            values.append(int(float(part[:-1]) * scale[part[-1]]) if part[-1] in scale
                          else int(float(part)))
        except (ValueError, OverflowError):
            raise typer.BadParameter(f"not a count: {given!r}") from None
    if not values:
        raise typer.BadParameter("give at least one size")
    return values


def bench_ann(
    n: Annotated[
        str, typer.Option("--n", help="Collection sizes, comma-separated (10000,100k,1M).")
    ] = "10000,100000,1000000",
    dim: Annotated[int, typer.Option("--dim", min=16, help="Vector dimension.")] = 512,
    kinds: Annotated[
        str, typer.Option("--kinds", help="Index types: auto,flat,hnsw,ivf,ivfpq (re-ranked), "
                          "ivfpq-norefine (PQ alone).")
    ] = "auto,flat,hnsw,ivf,ivfpq,ivfpq-norefine",
    queries: Annotated[
        int, typer.Option("--queries", min=1, help="Queries (fresh draws, not in the collection).")
    ] = 1000,
    budget: Annotated[
        float,
        typer.Option("--budget", min=1.0, help="Seconds each index may take to build; one "
                     "projected to take longer is reported as skipped (budget)."),
    ] = 600.0,
    memory: Annotated[
        str | None,
        typer.Option("--memory", help="Memory budget auto plans for, e.g. 1G (default: RAM/4)."),
    ] = None,
    target: Annotated[
        float, typer.Option("--target", min=0.0, max=1.0, help="Recall@10 the tuning aims at.")
    ] = 0.95,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="faiss threads for batch search.")
    ] = None,
    seed: int = 0,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write recall@10 vs queries/s here (PNG).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Recall@10 vs exact, queries/s, single-query latency, build time and bytes per vector
    of each index type; the auto index's speedup over exact search for one query."""
    # Before faiss loads its OpenMP runtime, which reads this once. On a machine shared with
    # other jobs, spinning OpenMP threads lose their core at every barrier: PQ training ran
    # 6x slower on 2 threads than on 1 here until they slept instead (set it to ACTIVE to
    # measure the default).
    if "faiss" not in sys.modules:  # too late otherwise, and the report would claim it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from vqret.benchmarks.ann import run_ann_benchmark
    from vqret.retrieval.ann import parse_bytes

    try:
        report = run_ann_benchmark(
            _ints(n),
            dim=dim,
            kinds=[k.strip() for k in kinds.split(",") if k.strip()],
            n_queries=queries,
            budget_s=budget,
            memory=parse_bytes(memory) if memory else None,
            target=target,
            threads=threads,
            seed=seed,
            plot=plot,
            log=None if as_json else err.print,
        )
    except ValueError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for result in report["results"]:
        out.print(_table(result, report["config"]))
        out.print(_summary(result["summary"], report["config"]), highlight=False)
    if plot is not None:
        out.print(f"plot: {plot}", highlight=False)


def _table(result: dict[str, Any], config: dict[str, Any]) -> Table:
    table = Table(title=f"n = {result['n']:,} x {config['dim']}, {config['queries']} queries, "
                  f"{config['threads']} threads", title_justify="left")
    for name in ("kind", "index", "param", "recall@10", "batch q/s", "single ms",
                 "build s", "B/vector"):
        table.add_column(name, justify="left" if name in ("kind", "index", "param") else "right")
    rows = result["rows"]
    if not any(r["index"] == result["flat"]["index"] for r in rows):
        rows = [{**result["flat"], "kind": "exact"}, *rows]  # the baseline, always measured
    for row in rows:
        if row["status"] != "ok":
            table.add_row(row["kind"], row["index"], row["status"], "", "", "", "", "")
            continue
        table.add_row(
            row["kind"], row["index"], row["param"], f"{row['recall_at_10']:.3f}",
            f"{row['batch_qps']:,.0f}", f"{row['single_ms']:.3f}", f"{row['build_s']:.1f}",
            f"{row['bytes_per_vector']:,.0f}",
        )
    return table


def _summary(summary: dict[str, Any], config: dict[str, Any]) -> str:
    if "auto_speedup" not in summary:
        return f"auto ({summary['auto_index']}): not measured"
    text = (
        f"auto = {summary['auto_index']}: one query in {summary['auto_single_ms']:.3f} ms vs "
        f"{summary['flat_single_ms']:.3f} ms exact = {summary['auto_speedup']:.1f}x faster, "
        f"recall@10 {summary['auto_recall_at_10']:.3f}, "
        f"{summary['auto_bytes_per_vector']:,.0f} B/vector"
    )
    if summary["meets_target"] is None:
        return text
    verdict = "meets" if summary["meets_target"] else "misses"
    return f"{text}: {verdict} the target (recall@10 >= {config['target']}, >= 20x, <= 1.2 KB)"
