"""`vqret bench parts` at toy scale: the report's shape and its arithmetic, never its speed."""

from __future__ import annotations

import pytest
from vqret.benchmarks.part_checks import run


def test_bench_parts_reports_each_read_three_ways_as_ratios(tmp_path):
    result = run(n=2000, dim=16, part_rows=500, repeats=1, folder=tmp_path)
    assert result["parts"] == 4
    for read in ("lookup", "vectors", "index"):
        times = result[read]
        assert all(times[m] > 0 for m in ("unchecked", "verified", "cached"))
        assert times["verified_ratio"] == pytest.approx(
            times["verified"] / times["unchecked"], rel=0.05, abs=0.01)
    assert result["write"]["ratio"] == pytest.approx(
        result["write"]["checked"] / result["write"]["plain"], rel=0.05, abs=0.01)
    assert 0 < result["recovery_share"] < 1  # the rows without vectors: less than the parts
    assert list(tmp_path.iterdir()) == []  # the store it wrote is gone
