"""`vqret bench filter` end to end on a tiny collection: the report's shape and the relations
that hold whatever the timings are (ratios are the medians divided, verdicts follow the
numbers). Latencies themselves are never asserted."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import run_cli, run_json
from vqret.benchmarks.ann_data import Mixture
from vqret.benchmarks.filter import (
    TARGET_RATIO,
    date_filter,
    run_filter_benchmark,
    subject_filter,
    synthetic_metadata,
)

SHARES = (0.001, 0.05, 0.5, 1.0)


@pytest.fixture(scope="module")
def report():
    return run_filter_benchmark(3000, dim=32, selectivities=SHARES, n_queries=24,
                                kind="ivf", components=64)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=2e-3, abs_tol=2e-3)


def test_the_report_has_a_row_per_filter_and_selectivity(report):
    assert report["index"]["kind"] == "ivf" and report["index"]["factory"].startswith("IVF")
    rows = report["rows"]
    assert [(r["filter"], r["selectivity"]) for r in rows] == [
        (f, s) for f in ("date", "subject") for s in SHARES]
    for row in rows:
        assert row["n_passing"] >= max(1, round(row["selectivity"] * 3000))
        assert row["route"] in ("exact", "ann") and row["results_complete"]
        assert 0.0 <= row["recall_at_10"] <= 1.0 and 0.0 <= row["recall_from_ids"] <= 1.0
        assert row["recall_target"] == (0.99 if row["selectivity"] < 0.01 else 0.95)
        assert set(row["forced"]) == {"exact", "ann"}


def test_ratios_are_the_medians_divided_and_verdicts_follow(report):
    for row in report["rows"]:
        assert row["baseline_ms"] > 0 and row["filtered_ms"] > 0
        assert close(row["ratio"], row["filtered_ms"] / row["baseline_ms"])
        assert close(row["from_ids_ratio"], row["from_ids_ms"] / row["baseline_ms"])
        assert row["meets_latency"] == (row["ratio"] <= TARGET_RATIO)
        assert row["meets_recall"] == (row["recall_at_10"] >= row["recall_target"])
        for forced in row["forced"].values():
            assert forced["ms"] > 0 and forced["ratio"] > 0
            assert 0.0 <= forced["recall_at_10"] <= 1.0
    summary, rows = report["summary"], report["rows"]
    assert summary["worst_ratio"] == max(r["ratio"] for r in rows)
    assert summary["worst_recall_at_10"] == min(r["recall_at_10"] for r in rows)
    assert summary["meets_targets"] == all(r["meets_recall"] and r["meets_latency"]
                                           for r in rows)


def test_a_filter_passing_every_row_searches_like_the_unfiltered_index(report):
    for row in report["rows"]:
        if row["selectivity"] == 1.0:
            assert row["route"] == "ann" and row["n_passing"] == 3000
            assert row["param_median"] == report["index"]["params"]["nprobe"]


def test_the_filters_pass_the_share_asked_for():
    mixture = Mixture.make(16, components=16, groups=4, seed=1)
    vectors = mixture.draw(5000, np.random.default_rng(0))
    meta = synthetic_metadata(vectors)
    rng = np.random.default_rng(2)
    for share in (0.001, 0.1, 0.5):
        passing, where = date_filter(meta, share, rng)
        assert len(passing) >= round(share * 5000) and "BETWEEN" in where
        lo, hi = (int(v) for v in where.split("BETWEEN ")[1].split(" AND "))
        np.testing.assert_array_equal(
            passing, np.flatnonzero((meta["taken"] >= lo) & (meta["taken"] <= hi)))
        near, _ = subject_filter(vectors, mixture, share, rng)
        assert len(near) == round(share * 5000) and len(np.unique(near)) == len(near)
    assert len(date_filter(meta, 1.0, rng)[0]) == 5000


def test_the_cli_prints_json_and_a_table():
    result = run_json("bench", "filter", "--n", "2000", "--dim", "16", "--queries", "8",
                      "--selectivities", "0.1%,50%", "--filters", "date", "--kind", "ivf")
    assert [r["selectivity"] for r in result["rows"]] == [0.001, 0.5]
    table = run_cli("bench", "filter", "--n", "2000", "--dim", "16", "--queries", "8",
                    "--selectivities", "1%", "--filters", "subject").stdout
    assert "recall@10" in table and "subject" in table and "worst recall@10" in table


def test_the_cli_refuses_bad_arguments():
    proc = run_cli("bench", "filter", "--n", "2000", "--filters", "camera", check=False)
    assert proc.returncode == 1 and "unknown filter" in proc.stderr
    proc = run_cli("bench", "filter", "--n", "2000", "--selectivities", "150%", check=False)
    assert proc.returncode == 1 and "(0, 1]" in proc.stderr
    proc = run_cli("bench", "filter", "--n", "2000", "--selectivities", "lots", check=False)
    assert proc.returncode == 2 and "not a share" in proc.stderr
