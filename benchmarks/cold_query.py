"""A cold `vqret search "text"`: a new process, end to end, ONNX text encoder vs torch.

Each run is the command a user types, timed from the outside (interpreter start-up, imports,
opening the store, embedding the query, the search, printing). The two paths take turns
(onnx, torch, onnx, torch, ...) so that a burst of load from other processes falls on both;
the medians are reported. One unmeasured run of each comes first: "cold" means a new
process, not a cold disk cache (the store's files are in the page cache after the first
search, as they are for a user's second search). The torch path is forced with
VQRET_TEXT_ENCODER=torch, the way it runs when no export is there.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

COLD_QUERY = "a photo of a red car"
PATHS = ("onnx", "torch")


def _search(store: Path, mode: str, query: str) -> tuple[float, list[dict]]:
    env = {**os.environ, "VQRET_TEXT_ENCODER": "auto" if mode == "onnx" else "torch"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vqret.cli.main", "search", query, "--store", str(store),
         "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"vqret search ({mode}) failed: {proc.stderr.strip()[-500:]}")
    return seconds, json.loads(proc.stdout)


def measure_cold_search(
    store: str | os.PathLike, *, repeats: int = 5, query: str = COLD_QUERY, warmup: bool = True
) -> dict[str, Any]:
    """Seconds per cold `vqret search` with each text path (medians of `repeats` runs),
    their ratio, and whether both gave the same top-k."""
    from .speed import CpuWatch

    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    store = Path(store)
    answers = {}
    if warmup:  # unmeasured: fills the page cache
        answers = {mode: _search(store, mode, query)[1] for mode in PATHS}
    times: dict[str, list[float]] = {mode: [] for mode in PATHS}
    with CpuWatch() as watch:
        for _ in range(repeats):
            for mode in PATHS:
                seconds, hits = _search(store, mode, query)
                times[mode].append(seconds)
                answers[mode] = hits
    ids = {mode: [h["id"] for h in hits] for mode, hits in answers.items()}
    scores = {mode: [h["score"] for h in hits] for mode, hits in answers.items()}
    onnx_s, torch_s = (statistics.median(times[mode]) for mode in PATHS)
    return {
        "cold_search_repeats": repeats,
        "cold_search_onnx_s": round(onnx_s, 3),
        "cold_search_torch_s": round(torch_s, 3),
        "cold_search_onnx_s_min": round(min(times["onnx"]), 3),
        "cold_search_torch_s_min": round(min(times["torch"]), 3),
        "cold_search_speedup": round(torch_s / onnx_s, 2),
        "cold_search_same_top_k": ids["onnx"] == ids["torch"],
        "cold_search_max_score_diff": max(
            (abs(a - b) for a, b in zip(scores["onnx"], scores["torch"], strict=False)),
            default=0.0,
        ),
        "other_cpu_pct_cold_search": watch.other_pct,
    }


def warm_onnx_latency_ms(store: str | os.PathLike, texts: Sequence[str], warmup: int = 3
                         ) -> list[float]:
    """Milliseconds per warm single-query embedding through the store's ONNX encoder (as a
    long-lived process loads it: weights pre-packed, full BPE table)."""
    from vqret import Collection
    from vqret.retrieval.onnx_text import load_text_encoder

    encoder = load_text_encoder(store, Collection.open(store).store.spec)
    for i in range(warmup):
        encoder.embed_texts([f"warm-up {i}"])
    times = []
    for text in texts:
        started = time.perf_counter()
        encoder.embed_texts([text])
        times.append((time.perf_counter() - started) * 1e3)
    return times


def cold_search_benchmark(
    embedder: Any,
    paths: Sequence[str],
    workdir: str | os.PathLike,
    *,
    repeats: int = 5,
    texts: Sequence[str] = (),
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Index `paths` (linked into `workdir`) with `embedder`, export its text encoder as
    `vqret index` does, then time cold searches and warm ONNX queries on that store."""
    from vqret import Collection

    folder = Path(workdir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        target = folder / f"{i:05d}{Path(path).suffix}"
        try:
            os.link(path, target)
        except OSError:  # another file system
            shutil.copyfile(path, target)
    collection = Collection.create(folder, embedder=embedder)
    collection.index()
    started = time.perf_counter()
    status = collection.prepare_fast_text_search()
    export_s = time.perf_counter() - started
    if log:
        log(f"text encoder for cold searches: {status}")
    result: dict[str, Any] = {"cold_search_rows": len(collection.store),
                              "onnx_export": status, "onnx_export_s": round(export_s, 1)}
    if not status.startswith(("exported", "ready")):
        return result  # the torch path only: nothing to compare
    result.update(measure_cold_search(collection.store.path, repeats=repeats))
    if texts:
        warm = warm_onnx_latency_ms(collection.store.path, texts)
        result["text_query_onnx_ms_p50"] = round(statistics.median(warm), 2)
        result["text_query_onnx_ms_min"] = round(min(warm), 2)
    if log:
        log(f"cold vqret search: onnx {result['cold_search_onnx_s']:.2f} s, torch "
            f"{result['cold_search_torch_s']:.2f} s (median of {repeats}): "
            f"{result['cold_search_speedup']:.1f}x; same top-k: "
            f"{result['cold_search_same_top_k']}")
    return result
