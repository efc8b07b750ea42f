"""`vqret bench ray` end to end at toy scale, on the module's local Ray (2 CPUs), which the
command joins with --address. Asserted: the report's structure and the invariants that could
fail (counts, ratios recomputed from the reported numbers, the engines' agreement, recall
against exact search, memory against what a build must hold). Timings are not asserted, and
the recomputed ratios are held to the report's rounding exactly, never to a relative tolerance:
how far 3 decimals move a ratio depends on how long the timed thing took.

Ray is an optional extra, hence the importorskip; the test extra installs it.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from conftest import run_cli, run_json
from fixtures.shapes import make_shape_folder

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_address():
    """The address of a local Ray with 2 CPUs (the one already running, if any)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _half(decimals: int) -> float:
    return 0.5 * 10**-decimals


def _rounded_from(reported: float, exact: float, decimals: int = 3) -> bool:
    """`reported` is `exact` rounded to `decimals` places (give or take float error): for a
    figure the report computes from other figures it reports."""
    return abs(reported - exact) <= _half(decimals) + 1e-9 * abs(exact)


def _quotient_of_rounded(reported: float, numerator: float, denominator: float,
                         den_decimals: int, decimals: int = 3) -> bool:
    """`reported` is numerator / d rounded to `decimals` places, for a d that the report
    shows as `denominator` rounded to `den_decimals` places: a rate computed from an
    unrounded time, checked against the time as reported."""
    h = _half(den_decimals)
    low = numerator / (denominator + h)
    high = numerator / (denominator - h) if denominator > h else math.inf
    slack = _half(decimals) + 1e-9 * reported
    return low - slack <= reported <= high + slack


def test_bench_ray_measures_both_engines_and_both_builds(ray_address, tmp_path, tiny_clip):
    folder = tmp_path / "images"
    make_shape_folder(folder, 12, seed=5)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 4)
    saved = tmp_path / "report.json"
    result = run_json(
        "bench", "ray", "--part", "all", "--folder", str(folder), "--images", "13",
        "--model", tiny_clip[0], "--pretrained", tiny_clip[1], "-b", "4",
        "--rows", "3000", "--dim", "64", "--rows-per-shard", "1000", "--part-rows", "500",
        "--address", ray_address, "--report", str(saved),
    )
    assert json.loads(saved.read_text()) == result

    embed = result["embed"]
    assert embed["ray_cpus"] == 2 and not embed["random_weights"]
    configs = embed["configs"]
    assert [(c["engine"], c["actors"], c["cpus_per_actor"]) for c in configs] == [
        ("local", 1, None), ("ray-1-actor", 1, 2.0), ("ray-actor-per-cpu", 2, 1.0)]
    local = configs[0]
    for c in configs:
        # every engine indexed the same 13 files: 12 images and one that fails to decode
        assert (c["images"], c["failed"]) == (12, 1)
        assert 0 < c["first_batch_s"] <= c["wall_s"]
        # from the unrounded wall time; the ratio from the rates as reported
        assert _quotient_of_rounded(c["images_per_s"], c["images"], c["wall_s"], 3)
        assert _rounded_from(c["ratio_images_per_s"], c["images_per_s"] / local["images_per_s"])
        rate = c.get("per_actor_images_per_s") or c["steady_images_per_s"]
        if rate:
            assert _rounded_from(c["fixed_s"], c["wall_s"] - c["images"] / (rate * c["actors"]))
    for c in configs[1:]:
        # the actors can't have been busy longer than they existed (wall_s is rounded)
        assert 0 < c["worker_busy_s"] <= (c["wall_s"] + _half(3)) * c["actors"]
        assert _quotient_of_rounded(c["per_actor_images_per_s"], c["images"],
                                    c["worker_busy_s"], 6)
        if "per_cpu_images_per_s" in c:
            assert _rounded_from(c["per_cpu_images_per_s"],
                                 c["per_actor_images_per_s"] / c["cpus_per_actor"])
            local_per_cpu = local["steady_images_per_s"] / local["torch_threads"]
            assert _rounded_from(c["local_per_cpu_images_per_s"], local_per_cpu)
            assert _rounded_from(c["ratio_per_cpu"], c["per_cpu_images_per_s"] / local_per_cpu)
        assert c["min_cosine_vs_local"] >= 0.999
    assert embed["min_cosine"] == min(c["min_cosine_vs_local"] for c in configs[1:])

    index = result["index"]
    assert index["raw_vector_bytes"] == 3000 * 64 * 4
    inproc, sharded = index["in_process"], index["sharded"]
    assert inproc["factory"] == sharded["factory"] == index["factory"]
    for build in (inproc, sharded):
        # fresh queries, not members: near the recall the build tuned for, never above 1
        assert 0.85 <= build["recall_at_10"] <= 1.0
        assert abs(build["recall_at_10"] - build["tuned_recall_at_10"]) <= 0.1
        assert build["driver_peak_rss_bytes"] >= build["driver_rss_before_bytes"] > 0
        assert _rounded_from(build["driver_peak_per_raw_byte"],
                             build["driver_peak_rss_bytes"] / index["raw_vector_bytes"])
    # the in-process build reads every vector into its own memory
    grown = inproc["driver_peak_rss_bytes"] - inproc["driver_rss_before_bytes"]
    assert grown >= index["raw_vector_bytes"]
    assert sharded["ray_workers_seen"] >= 1
    assert sharded["ray_worker_peak_rss_bytes"] >= sharded["ray_worker_min_peak_rss_bytes"] > 0
    assert _rounded_from(index["sharded_wall_ratio"], sharded["wall_s"] / inproc["wall_s"])
    assert _rounded_from(index["driver_peak_ratio"],
                         sharded["driver_peak_rss_bytes"] / inproc["driver_peak_rss_bytes"])


def test_bench_ray_bad_input_is_one_line(tmp_path):
    missing = run_cli("bench", "ray", "--part", "embed", "--folder", str(tmp_path / "nope"),
                      check=False)
    assert missing.returncode == 1
    assert "nope: no such folder" in missing.stderr and "Traceback" not in missing.stderr
    wrong = run_cli("bench", "ray", "--part", "both", check=False)
    assert wrong.returncode == 1 and "--part must be one of" in wrong.stderr
