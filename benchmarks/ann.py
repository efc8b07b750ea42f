"""ANN benchmark: each index type against exact search, on clustered CLIP-like vectors.

For every collection size n and index type it reports recall@10 against exact (flat) search,
queries/s for a batch of queries, the median latency of one query at a time, build time
(train + add) and bytes per vector (the serialized index divided by n); plus, per n, how much
faster the auto index answers a single query than exact search, both measured in the same
run on the same queries. Absolute numbers depend on the machine and on what else runs on it;
the speedup is the figure that travels.

The vectors: a Gaussian mixture shaped like CLIP embeddings (ann_data.py).

Memory at 1M x 512: the vectors live once, inside the exact index (2 GiB of float32, filled in
chunks); the other indexes are built from a view of that storage, one at a time.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from vqret.retrieval import ann

from .ann_data import CHUNK, Mixture, exact_collection

Log = Callable[[str], Any]

# What faiss' OpenMP runtime read when it loaded (with this module, unless faiss came first).
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "default")

K = 10
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_BUDGET_S = 600.0
LATENCY_QUERIES = 200  # single queries timed per index (fewer if they take long: see _latency)
LATENCY_SECONDS = 10.0
BATCH_SECONDS = 0.5  # a batch search is repeated until it has run this long, best run kept
# The sweep drawn in the plot: search parameters from cheap to thorough.
SWEEP = {
    "nprobe": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    "efSearch": (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
}
TARGET_N = 1_000_000  # issue 3: at 1M x 512, recall@10 >= 0.95, >= 20x exact, <= 1.2 KB
TARGET_SPEEDUP = 20.0
TARGET_BYTES = 1200.0
# Product quantization as it was before exact re-ranking, measured beside the re-ranked one.
NO_REFINE = "ivfpq-norefine"
BENCH_KINDS = (*ann.KINDS, NO_REFINE)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@contextmanager
def omp_threads(n: int):
    """faiss' OpenMP thread count inside the block."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def serialized_bytes(index: faiss.Index) -> int:
    """Size of faiss.serialize_index(index), counted as it streams: at 1M x 512 the flat index
    would otherwise be copied twice more (faiss' buffer, then numpy's)."""
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def batch_search(
    index: faiss.Index, queries: np.ndarray, k: int = K, min_s: float = BATCH_SECONDS
) -> tuple[float, np.ndarray]:
    """(queries/s, ids) of one search call over all queries: the best of repeated runs, since
    on a shared machine the slow runs measure the neighbours, not the index."""
    best, runs, spent = math.inf, 0, 0.0
    found = np.empty((0, k), np.int64)
    while runs < 2 or (spent < min_s and runs < 20):
        started = time.perf_counter()
        found = index.search(queries, k)[1]
        elapsed = time.perf_counter() - started
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return len(queries) / best, found


def single_latency_ms(
    index: faiss.Index,
    queries: np.ndarray,
    k: int = K,
    threads: int = 1,
    max_queries: int = LATENCY_QUERIES,
    max_s: float = LATENCY_SECONDS,
) -> float:
    """Median ms of one query at a time (what an interactive search pays), after 3 warm-up
    queries; stops early once `max_s` is spent (exact search at 1M takes ~0.1 s a query)."""
    with omp_threads(threads):
        for q in queries[:3]:
            index.search(q[None, :], k)
        times: list[float] = []
        deadline = time.perf_counter() + max_s
        for q in queries[:max_queries]:
            started = time.perf_counter()
            index.search(q[None, :], k)
            times.append(time.perf_counter() - started)
            if started > deadline and len(times) >= 10:
                break
    return float(np.median(times) * 1000)


def _single_ms(index: faiss.Index, queries: np.ndarray, threads: int) -> dict[str, float]:
    """Single-query latency on 1 thread and on all, and the better of the two as `single_ms`.

    Which wins depends on the index and the machine (exact search splits one query across
    threads; on a shared 2-core machine that was 4x slower than 1 thread): each index, the
    baseline included, is credited with its better setting, so the speedup is not inflated.
    """
    one = single_latency_ms(index, queries, threads=1)
    every = single_latency_ms(index, queries, threads=threads) if threads > 1 else one
    return {"single_ms": round(min(one, every), 3), "single_ms_1_thread": round(one, 3),
            "single_ms_all_threads": round(every, 3)}


# --------------------------------------------------------------------------------------------
# Building within a time budget
# --------------------------------------------------------------------------------------------


class BudgetExceeded(Exception):
    pass


def build_within(
    plan: ann.IndexPlan, vectors: np.ndarray, budget_s: float, min_add_s: float = 2.0
) -> tuple[faiss.Index, float, float]:
    """(index, train s, add s): trained as vqret trains it, then filled in chunks.

    Between chunks the total build time is projected from the add rate so far; once it would
    exceed `budget_s` the build stops (BudgetExceeded) instead of running for an hour (after
    `min_add_s` of adding, so that the rate isn't guessed from the first milliseconds).
    Training itself is one faiss call and can't be interrupted; its cost is known in advance
    (k-means over at most 64 points per list) and is a minute at 1M x 512 on 2 cores.
    """
    n = len(vectors)
    started = time.perf_counter()
    index = ann.build_index(plan, np.empty(0, np.int64), vectors)  # trains on a sample
    train_s = time.perf_counter() - started
    if train_s > budget_s:
        raise BudgetExceeded(f"training alone took {train_s:.0f} s > budget {budget_s:.0f} s")
    # Small chunks early give a projection before much time is spent; HNSW inserts get
    # slower as the graph deepens (log n), hence the 1.2 margin on a linear projection.
    step = max(1000, min(CHUNK, n // 50))
    add_started = time.perf_counter()
    for start in range(0, n, step):
        end = min(n, start + step)
        index.add_with_ids(vectors[start:end], np.arange(start, end, dtype=np.int64))
        add_s = time.perf_counter() - add_started
        projected = train_s + add_s * n / end * (1.2 if plan.kind == "hnsw" else 1.0)
        if end < n and add_s >= min_add_s and projected > budget_s:
            rate = end / add_s
            raise BudgetExceeded(
                f"projected {projected:.0f} s > budget {budget_s:.0f} s "
                f"({end:,} of {n:,} added in {add_s:.0f} s, {rate:,.0f} vectors/s)"
            )
    return index, train_s, time.perf_counter() - add_started


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _param_text(params: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def _sweep(
    index: faiss.Index,
    plan: ann.IndexPlan,
    queries: np.ndarray,
    truth: np.ndarray,
    flat_qps: float,
    tuned: dict[str, int],
) -> list[dict[str, float]]:
    """Recall@10 and batch queries/s along nprobe / efSearch (the curve in the plot)."""
    name = "efSearch" if plan.kind == "hnsw" else "nprobe"
    points = []
    for value in SWEEP[name]:
        if name == "nprobe" and value > plan.nlist:
            break
        ann.set_search_params(index, {name: value})
        qps, found = batch_search(index, queries, min_s=0.2)
        recall = ann.recall_vs_exact(found, truth)
        points.append({name: value, "recall_at_10": round(recall, 4), "qps": round(qps, 1)})
        # Past ~all neighbours found, or slower than exact search, the curve says nothing new.
        if recall >= 0.999 or qps < 0.5 * flat_qps:
            break
    ann.set_search_params(index, tuned)
    return points


def _measure_ann(
    plan: ann.IndexPlan,
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    flat_qps: float,
    budget_s: float,
    target: float,
    threads: int,
    log: Log,
) -> dict[str, Any]:
    row: dict[str, Any] = {"index": plan.faiss_factory, "reason": plan.reason}
    try:
        index, train_s, add_s = build_within(plan, vectors, budget_s)
    except BudgetExceeded as e:
        log(f"    {plan.faiss_factory}: skipped (budget): {e}")
        return {**row, "status": "skipped (budget)", "note": str(e)}
    row.update(status="ok", train_s=round(train_s, 2), add_s=round(add_s, 2),
               build_s=round(train_s + add_s, 2))
    started = time.perf_counter()
    ann.tune(index, plan, vectors, target=target)  # recall on the collection's own vectors
    row["tune_s"] = round(time.perf_counter() - started, 2)
    row["param"] = _param_text(plan.params)
    row["params"] = dict(plan.params)
    row["tuning_recall"] = plan.recall_at_10
    qps, found = batch_search(index, queries)
    row["batch_qps"] = round(qps, 1)
    row["recall_at_10"] = round(ann.recall_vs_exact(found, truth), 4)
    row.update(_single_ms(index, queries, threads))
    row["bytes_per_vector"] = round(serialized_bytes(index) / len(vectors), 1)
    row["sweep"] = _sweep(index, plan, queries, truth, flat_qps, plan.params)
    del index
    gc.collect()
    return row


def run_ann_benchmark(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    dim: int = 512,
    kinds: Sequence[str] = BENCH_KINDS,
    n_queries: int = 1000,
    budget_s: float = DEFAULT_BUDGET_S,
    memory: int | None = None,
    target: float = 0.95,
    components: int = 2048,
    threads: int | None = None,
    seed: int = 0,
    plot: Path | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Measure every index type in `kinds` at every collection size in `sizes`.

    Returns {"config": ..., "results": [one dict per n: rows per kind, flat baseline, auto's
    speedup and whether it meets the targets]}; writes the recall / queries-per-second plot
    to `plot` when given. `memory` is the budget auto plans for (default RAM / 4).
    """
    say: Log = log or (lambda _message: None)
    bad = [k for k in kinds if k not in BENCH_KINDS]
    if bad:
        raise ValueError(f"unknown index type(s) {', '.join(bad)}: use {', '.join(BENCH_KINDS)}")
    if not sizes or min(sizes) < 2 * K:
        raise ValueError(f"sizes must be at least {2 * K} vectors")
    if n_queries < 1:
        raise ValueError("queries must be >= 1")
    if plot is not None:
        _require_matplotlib()
    threads = threads or faiss.omp_get_max_threads()
    memory = memory or ann.default_memory_budget()
    mixture = Mixture.make(dim, components=components, seed=seed)
    queries = mixture.draw(n_queries, np.random.default_rng([seed, 1]))
    config = {
        "dim": dim, "kinds": list(kinds), "queries": n_queries, "k": K, "target": target,
        "budget_s": budget_s, "memory_budget": memory, "components": components,
        "threads": threads, "faiss": faiss.__version__, "seed": seed,
        "omp_wait_policy": OMP_WAIT_POLICY,
    }
    results = []
    with omp_threads(threads):
        for n in sizes:
            results.append(_run_size(mixture, n, queries, kinds, budget_s, memory, target,
                                     threads, seed, say))
    report = {"config": config, "results": results}
    if plot is not None:
        write_plot(report, plot)
        report["plot"] = str(plot)
    return report


def _run_size(
    mixture: Mixture,
    n: int,
    queries: np.ndarray,
    kinds: Sequence[str],
    budget_s: float,
    memory: int,
    target: float,
    threads: int,
    seed: int,
    say: Log,
) -> dict[str, Any]:
    dim = len(mixture.std)
    started = time.perf_counter()
    exact, _flat, vectors = exact_collection(mixture, n, seed)
    say(f"n={n:,}: drew {n:,} x {dim} vectors in {time.perf_counter() - started:.1f} s")

    flat_qps, truth = batch_search(exact, queries)
    flat_row = {
        "kind": "flat", "index": "IDMap2,Flat", "status": "ok", "param": "-", "params": {},
        "recall_at_10": 1.0, "batch_qps": round(flat_qps, 1), "build_s": 0.0,
        **_single_ms(exact, queries, threads),
        "bytes_per_vector": round(serialized_bytes(exact) / n, 1),
        "reason": "exact search: the baseline",
    }
    flat_row["sweep"] = [{"recall_at_10": 1.0, "qps": flat_row["batch_qps"]}]
    say(f"  flat: {flat_row['batch_qps']:,.0f} q/s batch, {flat_row['single_ms']:.2f} ms single")

    # Each distinct index is measured once; kinds that plan the same index share its row
    # (auto is always one of the others unless --memory pushes it to 8-bit IVF).
    measured: dict[str, dict[str, Any]] = {"IDMap2,Flat": flat_row}
    rows = []
    for kind in kinds:
        plan = _plan(n, dim, kind, memory)
        name = plan.faiss_factory
        if name not in measured:
            say(f"  {kind}: {name} ({plan.reason})")
            measured[name] = _measure_ann(plan, vectors, queries, truth, flat_qps,
                                          budget_s, target, threads, say)
            m = measured[name]
            if m["status"] == "ok":
                say(f"    {m['param']}: recall@10 {m['recall_at_10']:.3f}, "
                    f"{m['batch_qps']:,.0f} q/s batch, {m['single_ms']:.3f} ms single, "
                    f"build {m['build_s']:.1f} s, {m['bytes_per_vector']:.0f} B/vector")
        rows.append({**measured[name], "kind": kind})

    auto = ann.plan_index(n, dim, "auto", memory)
    auto_row = measured.get(auto.faiss_factory)
    summary: dict[str, Any] = {"n": n, "flat_single_ms": flat_row["single_ms"],
                               "auto_index": auto.faiss_factory}
    if auto_row is not None and auto_row["status"] == "ok":
        speedup = flat_row["single_ms"] / auto_row["single_ms"]
        summary.update(
            auto_single_ms=auto_row["single_ms"],
            auto_speedup=round(speedup, 1),
            auto_recall_at_10=auto_row["recall_at_10"],
            auto_bytes_per_vector=auto_row["bytes_per_vector"],
            # the issue states its target at 1M: below that, exact search is cheap anyway
            meets_target=None if n < TARGET_N else bool(
                auto_row["recall_at_10"] >= target
                and speedup >= TARGET_SPEEDUP
                and auto_row["bytes_per_vector"] <= TARGET_BYTES
            ),
        )
        say(f"  auto ({auto.faiss_factory}): {speedup:.1f}x faster than exact for one query")
    del exact, vectors
    gc.collect()
    return {"n": n, "rows": rows, "flat": flat_row, "summary": summary}


def _plan(n: int, dim: int, kind: str, memory: int) -> ann.IndexPlan:
    if kind == NO_REFINE:
        return ann.plan_index(n, dim, "ivfpq", memory, refine=False)
    return ann.plan_index(n, dim, kind, memory)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'vqret[bench]'") from None


COLOURS = {"flat": "black", "hnsw": "tab:green", "ivf": "tab:blue", "ivfpq": "tab:red",
           "ivfpq+refine": "tab:orange"}


def _family(factory: str) -> str:
    """The index type of a factory string, so a type keeps its colour in every panel."""
    if "HNSW" in factory:
        return "hnsw"
    if "PQ" in factory:
        return "ivfpq+refine" if "RFlat" in factory else "ivfpq"
    return "ivf" if "IVF" in factory else "flat"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """One panel per n: recall@10 (x) against batch queries/s (y, log), a line per index type
    sweeping nprobe / efSearch, the tuned point circled and exact search as the baseline."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        drawn: set[str] = set()
        for row in [result["flat"], *result["rows"]]:
            if row["status"] != "ok" or row["index"] in drawn:
                continue
            drawn.add(row["index"])
            family = _family(row["index"])
            label = "flat (exact)" if family == "flat" else row["index"]
            points = row["sweep"]
            (line,) = ax.plot([p["recall_at_10"] for p in points], [p["qps"] for p in points],
                              marker="o" if len(points) == 1 else ".", label=label,
                              color=COLOURS[family])
            # the tuned setting, circled on its own curve (the row's batch figure is a separate
            # run: on a shared machine two runs of the same search differ by 10-30%)
            tuned = [p for p in points if p.items() >= row["params"].items()]
            if row["params"] and tuned:
                ax.plot(tuned[0]["recall_at_10"], tuned[0]["qps"], "o", mfc="none", ms=11,
                        color=line.get_color())
        ax.axvline(report["config"]["target"], color="grey", lw=0.8, ls="--", label="target")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("queries/s (batch)")
        ax.set_title(f"n = {result['n']:,} x {report['config']['dim']}  "
                     f"(auto: {result['summary']['auto_index']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("circled: tuned to the recall target on the collection's own vectors",
                 fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
