"""The speed benchmark runs end to end on a tiny model; timings themselves are not asserted."""

from __future__ import annotations

import json
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
}


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
    assert result["vqret_images_per_s"] > 0
    assert result["baseline_images_per_s"] > 0
    assert result["ratio_vs_plain_loop"] > 0
    assert result["text_query_ms_p50"] > 0
    assert result["matmul_fp32_gflops"] > 0
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
    assert result["model_gflop_per_image"] > 0
    assert result["roof_images_per_s"] == pytest.approx(
        result["matmul_roof_gflops"] / result["model_gflop_per_image"], rel=0.01
    )
    assert result["share_of_roof"] == pytest.approx(
        result["vqret_images_per_s"] / result["roof_images_per_s"], rel=0.01
    )


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
    first = [Path(c).stat().st_mtime_ns for c in copies]
    assert upscaled_copies(sources, root, 0.12, cache=cache) == copies
    assert [Path(c).stat().st_mtime_ns for c in copies] == first  # reused, not remade
    with pytest.raises(ValueError, match="megapixels"):
        upscaled_copies(sources, root, 0, cache=cache)
