"""The speed benchmark runs end to end on a tiny model; timings themselves are not asserted.

What is: the report's keys, positive finite measurements, and every rounded figure equal to
its formula applied to the unrounded measurements the report carries under "raw", to within
the figure's own rounding. Never a rounded figure against one recomputed from other rounded
figures: how much rounding moves a ratio depends on how fast the machine was.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image
from vqret.benchmarks.speed import run_speed_benchmark

FIXTURE_CONFIG = Path(__file__).parent / "fixtures" / "tiny_clip" / "tiny-clip.json"
# Used when the shared fixture is absent: the smallest config open_clip accepts comfortably.
FALLBACK_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

EXPECTED_KEYS = {
    "device",
    "model",
    "batch_size",
    "workers",
    "n_images",
    "torch_threads",
    "matmul_fp32_gflops",
    "vqret_images_per_s",
    "baseline_images_per_s",
    "ratio_vs_plain_loop",
    "text_query_ms_p50",
    "raw",
}
RAW_KEYS = {
    "matmul_fp32_gflops",
    "matmul_roof_gflops",
    "model_gflop_per_image",
    "vqret_images",
    "vqret_seconds",
    "baseline_images",
    "baseline_seconds",
}


def _rounded_from(reported: float, exact: float, decimals: int) -> bool:
    """`reported` is `exact` rounded to `decimals` places (give or take float error)."""
    return abs(reported - exact) <= 0.5 * 10**-decimals + 1e-9 * abs(exact)


def _assert_consistent(result: dict) -> None:
    """Every figure is its formula over the raw measurements, rounded as the report rounds."""
    raw = result["raw"]
    assert RAW_KEYS <= raw.keys()
    for key in RAW_KEYS:
        assert math.isfinite(raw[key]) and raw[key] > 0, key
    vqret_rate = raw["vqret_images"] / raw["vqret_seconds"]
    base_rate = raw["baseline_images"] / raw["baseline_seconds"]
    roof_rate = raw["matmul_roof_gflops"] / raw["model_gflop_per_image"]
    for key, exact, decimals in [
        ("matmul_fp32_gflops", raw["matmul_fp32_gflops"], 1),
        ("matmul_roof_gflops", raw["matmul_roof_gflops"], 1),
        ("model_gflop_per_image", raw["model_gflop_per_image"], 3),
        ("roof_images_per_s", roof_rate, 2),
        ("share_of_roof", vqret_rate / roof_rate, 3),
        ("vqret_images_per_s", vqret_rate, 2),
        ("vqret_seconds", raw["vqret_seconds"], 3),
        ("baseline_images_per_s", base_rate, 2),
        ("baseline_seconds", raw["baseline_seconds"], 3),
        ("ratio_vs_plain_loop", vqret_rate / base_rate, 3),
    ]:
        assert _rounded_from(result[key], exact, decimals), (key, result[key], exact)
    # the baseline encodes every file; vqret every file that decodes
    assert raw["baseline_images"] == result["n_images"]
    assert raw["vqret_images"] + result["decode_failures"] == result["n_images"]
    assert 0 < result["text_query_ms_min"] <= result["text_query_ms_p50"] <= (
        result["text_query_ms_max"])


def _tiny_config(tmp_path: Path) -> str:
    if FIXTURE_CONFIG.is_file():
        return str(FIXTURE_CONFIG)
    path = tmp_path / "bench-tiny-clip.json"
    path.write_text(json.dumps(FALLBACK_CONFIG))
    return str(path)


def test_speed_benchmark_runs_on_tiny_model(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (40 + i, 30), (30 * i, 255 - 30 * i, 128)).save(folder / f"{i}.png")
    lines: list[str] = []

    result = run_speed_benchmark(
        folder,
        model=_tiny_config(tmp_path),
        batch_size=4,
        limit=8,
        # One worker still exercises the DataLoader worker path and keeps the test quick.
        workers=1,
        log=lines.append,
    )

    assert EXPECTED_KEYS <= result.keys()
    assert result["n_images"] == 8
    assert result["decode_failures"] == 0
    if result["precision"] == "fp32":  # auto: bf16 where the CPU has AVX512-BF16
        # the roof is then the fp32 matmul rate itself, the same measurement
        assert result["raw"]["matmul_roof_gflops"] == result["raw"]["matmul_fp32_gflops"]
    _assert_consistent(result)
    assert lines, "progress lines go through `log`"
    json.dumps(result)  # the CLI prints it as JSON


def test_model_flops_match_a_hand_count_of_the_fixture_vit(tiny_clip) -> None:
    from vqret.benchmarks.speed import model_gflop_per_image
    from vqret.retrieval.embedder import Embedder

    cfg = json.loads(Path(tiny_clip[0]).read_text())
    v = cfg["vision_cfg"]
    width, tokens = v["width"], (v["image_size"] // v["patch_size"]) ** 2 + 1  # + class token
    per_layer = tokens * 12 * width**2 + 2 * tokens**2 * width  # qkv+out+4x MLP, QK^T and AV
    patch_embed = (tokens - 1) * 3 * v["patch_size"] ** 2 * width
    macs = v["layers"] * per_layer + patch_embed + width * cfg["embed_dim"]
    embedder = Embedder(*tiny_clip, device="cpu", num_workers=0)
    assert abs(model_gflop_per_image(embedder) - 2 * macs / 1e9) <= 0.02 * (2 * macs / 1e9)


def test_bench_reports_the_roof_at_its_precision(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 40), (60 * i, 20, 200)).save(folder / f"{i}.jpg")
    result = run_speed_benchmark(
        folder, model=_tiny_config(tmp_path), batch_size=4, limit=4, workers=0, precision="bf16"
    )
    assert result["precision"] == "bf16"
    assert (result["n_images"], result["decode_failures"]) == (4, 0)
    _assert_consistent(result)


def test_upscaled_copies_are_made_once_at_the_asked_size(tmp_path: Path) -> None:
    from vqret.benchmarks.speed import upscaled_copies

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "sub" / "a.png")
    Image.new("RGB", (30, 30), (10, 200, 10)).save(root / "b.jpg")
    sources = [str(root / "sub" / "a.png"), str(root / "b.jpg")]
    cache = tmp_path / "cache"

    copies = upscaled_copies(sources, root, 0.12, cache=cache)
    assert len(copies) == 2 and len(set(copies)) == 2
    for copy, (w0, h0) in zip(copies, [(40, 30), (30, 30)], strict=True):
        with Image.open(copy) as im:
            assert im.format == "JPEG"
            assert abs(im.width * im.height - 120_000) / 120_000 < 0.02
            assert abs(im.width / im.height - w0 / h0) < 0.01
    # An mtime far in the past: a copy made again would carry the present one, however soon
    # after the first it was made (a file system's clock ticks in milliseconds).
    for copy in copies:
        os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    assert upscaled_copies(sources, root, 0.12, cache=cache) == copies
    assert [Path(c).stat().st_mtime_ns for c in copies] == [1_000_000_000] * 2  # reused
    with pytest.raises(ValueError, match="megapixels"):
        upscaled_copies(sources, root, 0, cache=cache)
