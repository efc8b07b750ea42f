"""The serve latency benchmark runs end to end on the fixture model; timings aren't asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from serve_helpers import index_shapes  # noqa: E402
from vqret.benchmarks.serve_latency import format_table, run_serve_latency_benchmark  # noqa: E402


def test_serve_latency_benchmark_runs(embedder, tmp_path):
    collection, _ = index_shapes(tmp_path / "shapes", embedder, n=24)
    lines: list[str] = []
    result = run_serve_latency_benchmark(
        collection.store.path, requests=12, concurrency=(1, 3), device="cpu", log=lines.append
    )
    assert result["n_images"] == 25 and result["model"] == "tiny-clip"
    for key in (
        "in_process_text_ms_p50",
        "in_process_vector_ms_p99",
        "http_text_c1_ms_p50",
        "http_text_c3_ms_p99",
        "http_like_c1_ms_p50",
        "http_like_c3_req_per_s",
    ):
        assert result[key] > 0, key
    assert result["http_text_c3_mean_batch"] >= 1
    assert any("server at http://127.0.0.1:" in line for line in lines)
    table = format_table(result)
    assert "| HTTP text (model + index + HTTP), 3 clients" in table
    json.dumps(result)
