"""`vqret tokenizer train` and `vqret bench tokenizer`, run in-process through typer.

The commands are registered on a fresh app here exactly as cli/main.py registers them, so
these tests don't depend on the wiring in main.
"""

from __future__ import annotations

import json

import typer
from fixtures.shapes import make_shape_folder
from typer.testing import CliRunner
from vqret.cli.tokenizer import register

BENCH_KEYS = {
    "tokenizer_id",
    "images",
    "psnr",
    "ssim",
    "codebook_usage",
    "perplexity",
    "bytes_per_image",
    "bytes_per_image_uint16",
    "bytes_per_image_entropy",
    "encode_images_per_s",
    "decode_images_per_s",
}


def make_app() -> typer.Typer:
    app = typer.Typer()
    bench = typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    return app


def test_train_then_bench(tmp_path):
    make_shape_folder(tmp_path / "train", 40, seed=21)
    make_shape_folder(tmp_path / "unseen", 12, seed=22)
    app, runner = make_app(), CliRunner()
    ckpt = tmp_path / "ckpt"
    args = [
        "tokenizer",
        "train",
        "--images",
        str(tmp_path / "train"),
        "--out",
        str(ckpt),
        "--preset",
        "tiny",
        "--steps",
        "15",
        "-b",
        "8",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["step"] == 15 and report["metrics"]["num_codes"] == 64

    again = runner.invoke(app, [*args[:-8], "--steps", "20", "-b", "8", "--threads", "1"])
    assert again.exit_code == 0, again.output
    assert "step 20" in again.stdout

    bench = runner.invoke(
        app, ["bench", "tokenizer", "--images", str(tmp_path / "unseen"), "-c", str(ckpt), "--json"]
    )
    assert bench.exit_code == 0, bench.output
    numbers = json.loads(bench.stdout)
    assert BENCH_KEYS <= set(numbers) and numbers["images"] == 12
    assert 0 < numbers["codebook_usage"] <= 1 and numbers["bytes_per_image"] == 48


def test_clear_errors(tmp_path):
    app, runner = make_app(), CliRunner()
    make_shape_folder(tmp_path / "images", 4, seed=1)
    no_budget = runner.invoke(app, ["tokenizer", "train", "--images", str(tmp_path / "images")])
    assert no_budget.exit_code == 1 and "budget" in no_budget.output
    bad = runner.invoke(
        app,
        [
            "tokenizer",
            "train",
            "--images",
            str(tmp_path / "images"),
            "--steps",
            "1",
            "--preset",
            "tiny",
            "--set",
            "codebook_size=100000",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert bad.exit_code == 1 and "uint16" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(
        app, ["bench", "tokenizer", "--images", str(tmp_path / "images"), "-c", str(tmp_path)]
    )
    assert missing.exit_code == 1 and "no tokenizer checkpoint" in missing.output
    presets = runner.invoke(app, ["tokenizer", "presets", "--json"])
    assert json.loads(presets.stdout)["cpu"]["num_codes"] == 1024
