"""`vqret bench query` runs end to end on the fixture model; latencies are not asserted, only
relations that hold whatever they are (p50 <= p99, a sum at least each of its parts)."""

from __future__ import annotations

from conftest import run_cli, run_json


def test_bench_query_times_encoders_and_both_searches(tiny_clip):
    result = run_json("bench", "query", "--n", "2000", "--model", tiny_clip[0],
                      "--pretrained", tiny_clip[1])
    assert result["n"] == 2000 and result["dim"] == 64
    assert result["queries"] == 60
    assert {"torch"} <= result["encode_ms"].keys()
    if result["onnx"] == "exported":
        assert "onnx" in result["encode_ms"]
    assert set(result["search_ms"]) == {"auto", "exact"}
    assert result["encoder"] in result["encode_ms"]
    for part in (*result["encode_ms"].values(), *result["search_ms"].values(), result["total_ms"]):
        assert 0 < part["p50"] <= part["p99"]
    # the total is one encode plus one search per query, the same measurements summed, so
    # its median is at least either's (rounding to 3 decimals can make them equal)
    total = result["total_ms"]["p50"]
    assert total >= result["search_ms"]["auto"]["p50"]
    assert total >= result["encode_ms"][result["encoder"]]["p50"]
    # the encoder used is the one with the lowest median
    assert result["encode_ms"][result["encoder"]]["p50"] == min(
        part["p50"] for part in result["encode_ms"].values())
    assert result["index_recall_at_10"] >= 0.95


def test_bench_query_refuses_a_tiny_collection(tiny_clip):
    proc = run_cli("bench", "query", "--n", "10", "--model", tiny_clip[0], check=False)
    assert proc.returncode == 1
    assert "at least 1000" in proc.stderr
