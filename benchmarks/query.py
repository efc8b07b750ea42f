"""Warm text -> top-10 latency over a large collection: what one interactive query costs.

A query is two steps, timed apart: embedding the text (torch, and the ONNX Runtime export
that cold searches use) and searching the index. The collection is `n` vectors drawn from
the same CLIP-shaped Gaussian mixture as `vqret bench ann`, in the model's dimension, indexed
exactly as `vqret index` would index that many rows (the auto plan, tuned to recall@10 >=
0.95). The baseline, measured in the same run on the same query vectors, is exact search.

Every query text is different, so no query cache helps; faiss runs on one thread, as `vqret
search` and `vqret serve` run a single query.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np
from vqret.retrieval import ann
from vqret.retrieval.embedder import Embedder

from .ann import omp_threads
from .ann_data import Mixture, exact_collection

Log = Callable[[str], Any]

SUBJECTS = (
    "dog", "cat", "red car", "bicycle", "mountain lake", "city street at night", "bowl of soup",
    "old man reading", "sailing boat", "snowy forest", "child with a kite", "yellow flower",
    "train station", "laptop on a desk", "horse in a field", "birthday cake", "airplane",
    "beach at sunset", "guitar", "coffee cup",
)
TEMPLATES = ("a photo of a {}", "{}", "a blurry picture of the {}")
WARMUP = 3


def query_texts() -> list[str]:
    """60 distinct queries, from one word to a sentence."""
    return [t.format(s) for t in TEMPLATES for s in SUBJECTS]


def _timed_ms(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def _percentiles(times: Sequence[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def _encoder_latency(encode: Callable[[list[str]], np.ndarray], texts: list[str]) -> list[float]:
    for text in texts[:WARMUP]:
        encode([text + " warm-up"])  # distinct from the timed texts
    return [_timed_ms(lambda t=text: encode([t])) for text in texts]


def run_query_benchmark(
    n: int,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "none",
    memory: int | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Latency of warm single text queries over `n` vectors (see the module notes)."""

    def say(message: str) -> None:
        if log is not None:
            log(message)

    if n < 1000:
        raise ValueError(f"n must be at least 1000, got {n}")
    texts = query_texts()
    say(f"loading {model} (pretrained={pretrained})")
    embedder = Embedder(model, pretrained, device="cpu", num_workers=0)
    encoders: dict[str, Callable[[list[str]], np.ndarray]] = {"torch": embedder.embed_texts}
    with tempfile.TemporaryDirectory(prefix="vqret-bench-query-") as tmp:
        onnx_status = _add_onnx_encoder(encoders, tmp, embedder)
        say(f"ONNX text encoder: {onnx_status}")
        encode_ms = {name: _encoder_latency(fn, texts) for name, fn in encoders.items()}
        queries = encoders["torch"](texts)
    for name, times in encode_ms.items():
        say(f"encode ({name}): p50 {statistics.median(times):.1f} ms")

    say(f"drawing {n:,} vectors (d={embedder.embed_dim}) and building the auto index")
    mixture = Mixture.make(embedder.embed_dim)
    exact, _flat, vectors = exact_collection(mixture, n, seed=1)
    plan = ann.plan_index(n, embedder.embed_dim, "auto", memory)
    started = time.perf_counter()
    index = ann.build_index(plan, np.arange(n, dtype=np.int64), vectors)
    plan = ann.tune(index, plan, vectors)
    build_s = time.perf_counter() - started
    say(f"{plan.faiss_factory} {plan.params}: recall@10 {plan.recall_at_10}, built in "
        f"{build_s:.0f} s")

    search_ms: dict[str, list[float]] = {}
    with omp_threads(1):
        for name, idx in (("auto", index), ("exact", exact)):
            idx.search(queries[:WARMUP], 10)
            search_ms[name] = [_timed_ms(lambda q=q, i=idx: i.search(q[None], 10)) for q in queries]
    fastest = min(encode_ms, key=lambda name: statistics.median(encode_ms[name]))
    total = [e + s for e, s in zip(encode_ms[fastest], search_ms["auto"], strict=True)]
    speedup = statistics.median(search_ms["exact"]) / statistics.median(search_ms["auto"])
    say(f"text -> top-10: p50 {statistics.median(total):.1f} ms ({fastest} encoder + "
        f"{plan.faiss_factory}); the search alone is {speedup:.0f}x faster than exact")
    return {
        "n": n,
        "dim": embedder.embed_dim,
        "model": model,
        "queries": len(texts),
        "onnx": onnx_status,
        "index": plan.faiss_factory,
        "index_params": plan.params,
        "index_recall_at_10": plan.recall_at_10,
        "index_build_s": round(build_s, 1),
        "encode_ms": {name: _percentiles(t) for name, t in encode_ms.items()},
        "search_ms": {name: _percentiles(t) for name, t in search_ms.items()},
        "search_speedup_vs_exact": round(speedup, 1),
        "encoder": fastest,
        "total_ms": _percentiles(total),
        "faiss_threads": 1,
        "omp_max_threads": faiss.omp_get_max_threads(),
    }


def _add_onnx_encoder(encoders: dict, folder: str, embedder: Embedder) -> str:
    """Export the text tower as `vqret index` does, into a scratch folder."""
    try:
        from vqret.retrieval.onnx_text import (
            TextEncoderUnavailable,
            export_text_encoder,
            load_text_encoder,
        )
    except ImportError as e:
        return f"unavailable ({e})"
    try:
        export_text_encoder(folder, embedder)
        encoders["onnx"] = load_text_encoder(folder, embedder.spec).embed_texts
    except TextEncoderUnavailable as e:
        return f"unavailable ({e})"
    return "exported"
