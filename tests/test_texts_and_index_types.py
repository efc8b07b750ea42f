"""Captions as text rows (sidecars, caption files) and every index type, through the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, run_json
from vqret.retrieval.store import Store


def index_args(folder, tiny_clip, *extra):
    model, weights = tiny_clip
    return ["index", str(folder), "--model", model, "--pretrained", weights, "--device", "cpu",
            *extra]


def test_sidecar_captions_and_caption_files(shapes_folder, tiny_clip, tmp_path):
    folder, drawn = shapes_folder
    red_circle, green_square = drawn[0][0], drawn[5][0]
    assert "_red_circle" in red_circle.name and "_green_square" in green_square.name
    red_circle.with_suffix(".txt").write_text("a red circle\n")
    green_square.with_suffix(".json").write_text(
        json.dumps({"caption": ["a green square", "a square that is green"]})
    )
    report = run_json(*index_args(folder, tiny_clip))
    assert report["texts"]["added"] == 3

    hits = run_json("search", "--image", str(green_square), "--texts", "-k", "2", cwd=folder)
    assert hits[0]["text"] == "a green square"
    assert hits[0]["path"] == green_square.name  # the caption links to its image
    assert {h["text"] for h in hits} == {"a green square", "a square that is green"}

    again = run_json("index", str(folder))
    assert again["texts"] == {"added": 0, "removed": 0, "unchanged": 3}
    red_circle.with_suffix(".txt").unlink()
    assert run_json("index", str(folder))["texts"]["removed"] == 1

    captions = tmp_path / "more.csv"
    captions.write_text(f"text,image\na blue star,\na red circle,{red_circle.name}\n")
    assert run_json("index-texts", str(captions), "--store", str(folder / ".vqret")) == {
        "added": 2, "removed": 0, "unchanged": 0, "failed": []}
    hits = run_json("search", "a blue star", "--texts", "-k", "1", cwd=folder)
    assert hits[0]["text"] == "a blue star" and hits[0]["path"] is None
    table = run_cli("search", "--image", str(red_circle), "--texts", "-k", "1", cwd=folder)
    assert "a red circle" in table.stdout and red_circle.name in table.stdout
    # the file's rows are replaced when it changes; sidecar rows are untouched
    captions.write_text("text\na blue star\n")
    report = run_json("index-texts", str(captions), "--store", str(folder / ".vqret"))
    assert report["removed"] == 1 and report["unchanged"] == 1
    assert Store(folder / ".vqret").count("texts") == 3


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_index_types_stay_right_through_incremental_runs(tmp_path, tiny_clip, kind):
    from fixtures.shapes import make_shape_folder

    folder = tmp_path / "images"
    folder.mkdir()
    drawn = make_shape_folder(folder, 300, seed=11)  # enough to train IVF and PQ quantizers
    report = run_json(*index_args(folder, tiny_clip, "--index", kind))
    assert report["index"]["kind"] == kind
    assert report["index"]["recall_at_10"] >= (0.95 if kind != "ivfpq" else 0.5)
    query = drawn[9][0]
    top = run_json("search", "--image", str(query), "-k", "5", cwd=folder)
    if kind == "ivfpq":  # compressed codes: the twin images of a class may come first
        assert query.name in [r["path"] for r in top]
    else:
        assert top[0]["path"] == query.name

    gone = [drawn[i][0] for i in (9, 10, 11)]
    for path in gone:
        path.unlink()
    report = run_json("index", str(folder))  # the type chosen before is kept
    assert report["removed"] == 3 and report["index"]["kind"] == kind
    results = run_json("search", "a red circle", "-k", "297", cwd=folder)
    paths = {r["path"] for r in results}
    assert not paths & {p.name for p in gone}
    assert len(results) == 297  # k = the whole collection returns all of it

    info = json.loads(run_cli("info", "--json", cwd=folder).stdout)
    assert info["index"]["kind"] == kind and info["index"]["up_to_date"]
    assert info["index"]["rebuild_rule"]
