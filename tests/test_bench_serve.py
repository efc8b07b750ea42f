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
        "http_knn_c1_ms_p50",
        "http_terms3_c3_ms_p50",
        "three_terms_vs_three_queries",
        "http_upload_c1_ms_p50",
        "http_upload_c3_req_per_s",
        "http_large_c3_ms_p99",
        "http_large_c3_peak_rss_mib",
        "text_idle_ms_p99",
        "text_under_uploads_ms_p99",
        "text_p99_under_uploads_vs_idle",
    ):
        assert result[key] > 0, key
    # every large upload was answered 200 or 503 (any other status fails the run)
    assert 0 <= result["http_large_c3_busy_503"] <= 12
    assert set(result["under_uploads_statuses"]) <= {"200", "503"}
    ratio = result["text_under_uploads_ms_p99"] / result["text_idle_ms_p99"]
    assert abs(result["text_p99_under_uploads_vs_idle"] - ratio) <= 5e-3 + 1e-2 * ratio
    assert result["http_text_c3_mean_batch"] >= 1
    # the ratio is computed from the two p50s the report carries, to its 3-decimal rounding
    ratio = result["http_terms3_c1_ms_p50"] / (3 * result["http_text_c1_ms_p50"])
    assert abs(result["three_terms_vs_three_queries"] - ratio) <= 5e-4 + 1e-2 * ratio
    assert any("server at http://127.0.0.1:" in line for line in lines)
    table = format_table(result)
    assert "| HTTP text, /api/search (model + index + HTTP), 3 clients" in table
    assert "| HTTP text, /knn-service (model + index + HTTP), 1 client (mean batch" in table
    assert "3 terms costs" in table
    assert "| HTTP image upload 7000x7000 1-bit PNG, /api/search" in table
    assert "while 3 clients upload 49 MP PNGs" in table
    json.dumps(result)
