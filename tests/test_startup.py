"""Every command pays only for what it does: a run with nothing to embed never imports torch
(nor loads a model), and what it leaves is what a full run would have left.

The checks run the command a user types in a fresh process, wrapped so that the process
reports at exit which heavy modules it really imported (a module object that exists only
as a lazy placeholder doesn't count: it never ran).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.shapes import caption, make_shape_folder
from fixtures.videos import make_shape_video

HEAVY = ("torch", "torchvision", "open_clip", "onnxruntime", "pandas", "faiss")

# Runs `vqret ARGS...` as `python -m vqret.cli.main` does, then prints the heavy modules
# that were really executed (a LazyLoader placeholder has no __spec__.loader_state done).
WRAPPER = r"""
import json, runpy, sys, importlib.util
heavy = json.loads(sys.argv[1])
sys.argv = ["vqret", *sys.argv[2:]]
code = 0
try:
    runpy.run_module("vqret.cli.main", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
def executed(name):
    m = sys.modules.get(name)
    if m is None:
        return False
    # a lazy module not yet touched still has the LazyLoader's class
    return not isinstance(m, importlib.util._LazyModule)
print("IMPORTED=" + json.dumps([n for n in heavy if executed(n)]), file=sys.stderr)
sys.exit(code)
"""


def run_reporting(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps(HEAVY), *args],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("IMPORTED=")][-1]
    return proc, set(json.loads(line.split("=", 1)[1]))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, embedder) -> Path:
    """20 drawn images indexed as `vqret index` does (rows, search index, text encoder),
    in this process: the model is loaded here already."""
    from vqret import Collection

    folder = tmp_path_factory.mktemp("startup") / "images"
    make_shape_folder(folder, 16, seed=21)
    (folder / "sub").mkdir()
    make_shape_folder(folder / "sub", 4, seed=22)
    collection = Collection.create(folder, embedder=embedder)
    collection.index()
    assert collection.prepare_fast_text_search().startswith("exported")
    return folder


def test_a_no_op_index_never_imports_torch(indexed: Path) -> None:
    from vqret import Collection

    store = indexed / ".vqret"
    index_file = store / "images.faiss"
    before = (index_file.read_bytes(), index_file.stat().st_mtime_ns)
    proc, imported = run_reporting("index", str(indexed))
    assert not imported & {"torch", "torchvision", "open_clip"}, imported
    # nor the text encoder's runtime, the search library or pandas: nothing needs them
    assert not imported, imported
    assert "nothing to embed" in proc.stdout and "20 unchanged" in proc.stdout, proc.stdout
    # the saved search index was current: left as it was, not rebuilt and rewritten
    assert (index_file.read_bytes(), index_file.stat().st_mtime_ns) == before

    # A changed file: the plan finds it, and only then is the model made and run.
    files = sorted(indexed.glob("*.png"))
    files[0].write_bytes(files[1].read_bytes() + b"\0")  # other bytes: embedded again
    collection = Collection.create(indexed)
    assert collection._embedder is None, "opening for an index loads no model"
    report = collection.index()
    assert (report.embedded, report.updated, report.unchanged) == (1, 1, 19)
    assert collection._embedder is not None
    hits = collection.search(embedding=collection.stored_vectors([0])[0], k=20)
    assert len(hits) == 20
    assert index_file.read_bytes() != before[0], "the search index took the new row"


def test_files_that_failed_to_decode_are_not_read_again_until_they_change(
        tmp_path: Path, embedder) -> None:
    """A broken image or video in the folder used to load the model on every run, to fail
    the same way again: now it is reported from the last run's record until it changes."""
    from vqret import Collection

    folder = tmp_path / "images"
    make_shape_folder(folder, 6, seed=23)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "broken.mp4").write_bytes(b"\0\1not a video" * 100)
    make_shape_video(folder / "clip.mp4")  # a good one: an unchanged video needs no model
    collection = Collection.create(folder, embedder=embedder)
    first = collection.index()
    assert collection.prepare_fast_text_search().startswith("exported")  # as `vqret index`
    assert sorted(f.path for f in first.failed) == ["broken.jpg", "broken.mp4"]
    assert first.added == 6 and first.failed_before == 0 and first.videos["added"] == 1

    proc, imported = run_reporting("index", str(folder))
    assert not imported & {"torch", "open_clip"}, imported
    assert "nothing to embed" in proc.stdout and "6 unchanged" in proc.stdout, proc.stdout
    summary = " ".join(proc.stdout.split())
    assert "2 failed (2 unchanged since they failed to decode" in summary
    moments = Collection.open(folder / ".vqret").store.count() - 6
    assert f"(6 images, {moments} video moments," in summary, "moments aren't images"
    proc, _ = run_reporting("index", str(folder), "--json")
    again = json.loads(proc.stdout)
    assert again["failed_before"] == 2
    assert {f["path"]: f["size"] for f in again["failed"]} == {
        "broken.jpg": 12, "broken.mp4": 1300}
    assert [f.path for f in Collection.open(folder / ".vqret").store.failures] == [
        f["path"] for f in again["failed"]], "the record is kept for the next run"

    # asked to: both read again, failing again as they are
    proc, imported = run_reporting("index", str(folder), "--retry-failed", "--json")
    retried = json.loads(proc.stdout)
    assert (len(retried["failed"]), retried["failed_before"]) == (2, 0)
    assert "torch" in imported

    # a file that changed is read again without being asked: now an image, it is indexed
    (folder / "broken.jpg").write_bytes((folder / sorted(
        p.name for p in folder.glob("*.png"))[0]).read_bytes())
    proc, _ = run_reporting("index", str(folder), "--json")
    fixed = json.loads(proc.stdout)
    assert fixed["added"] == 1 and [f["path"] for f in fixed["failed"]] == ["broken.mp4"]
    assert fixed["failed_before"] == 1


def test_index_texts_again_imports_no_torch(indexed: Path, tmp_path: Path) -> None:
    from vqret import Collection

    store = indexed / ".vqret"
    captions = tmp_path / "captions.csv"
    captions.write_text("text,image\n" + "\n".join(
        f"{caption(c, s)},x.png" for c, s in [("red", "star"), ("blue", "circle")]) + "\n")
    assert Collection.open(store).index_texts(captions)["added"] == 2
    again, imported = run_reporting("index-texts", str(captions), "--store", str(store),
                                    "--json")
    assert json.loads(again.stdout) == {"added": 0, "removed": 0, "unchanged": 2,
                                        "failed": []}
    assert not imported & {"torch", "open_clip"}, imported


def test_tokenizer_encode_and_dupes_with_nothing_to_do_import_no_torch(indexed: Path,
                                                                      tmp_path: Path) -> None:
    import torch
    from vqret import Collection
    from vqret.tokenizer.checkpoint import save_checkpoint
    from vqret.tokenizer.config import get_config
    from vqret.tokenizer.model import VQVAE

    torch.manual_seed(0)
    checkpoint = save_checkpoint(VQVAE(get_config("tiny")), tmp_path / "tok")
    store = indexed / ".vqret"
    first = Collection.open(store).encode_codes(checkpoint)
    assert first.encoded == 20
    proc, imported = run_reporting("tokenizer", "encode", "--store", str(store), "--tokenizer",
                                   str(checkpoint), "--json")
    again = json.loads(proc.stdout)
    assert (again["encoded"], again["skipped"], again["tokenizer"]) == (0, 20, first.tokenizer)
    assert again["grid"] == list(first.grid)
    assert not imported & {"torch", "open_clip"}, imported
    proc, imported = run_reporting("dupes", "--store", str(store), "--json")
    assert "groups" in json.loads(proc.stdout)
    assert not imported & {"torch", "open_clip"}, imported


def test_sidecar_captions_are_found_by_one_listing_per_folder(tmp_path: Path) -> None:
    from vqret.retrieval.store import Failure
    from vqret.retrieval.texts import sidecar_rows

    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("x.jpg", "a/y.v2.png", "a/b/z.jpeg", "a/b/none.jpg", ".hidden.jpg"):
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "x.txt").write_text("caption x\n")
    (tmp_path / "a" / "y.v2.json").write_text(json.dumps({"caption": ["one", "two"]}))
    (tmp_path / "a" / "b" / "z.txt").mkdir()  # a folder named like a sidecar: not one
    (tmp_path / "a" / "b" / "z.json").write_text("{broken")
    (tmp_path / ".hidden.txt").write_text("hidden")
    images = {"x.jpg": 1, "a/y.v2.png": 2, "a/b/z.jpeg": 3, "a/b/none.jpg": 4,
              ".hidden.jpg": 5, "gone/w.jpg": 6}
    failures: list[Failure] = []
    rows = sidecar_rows(tmp_path, images, failures)
    assert sorted((r.text, r.source, r.image_id) for r in rows) == [
        ("caption x", "x.txt", 1), ("hidden", ".hidden.txt", 5),
        ("one", "a/y.v2.json", 2), ("two", "a/y.v2.json", 2)]
    assert [f.path for f in failures] == ["a/b/z.json"]



def test_small_tables_are_searched_exactly_as_faiss_would() -> None:
    import faiss
    import numpy as np
    from vqret.retrieval.exact_small import ExactVectors
    from vqret.retrieval.filtered_search import Allowed

    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[7] = vectors[3]  # a copy: equal scores, the smaller id first
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    queries = rng.standard_normal((3, 32)).astype(np.float32)
    reference = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    reference.add_with_ids(vectors, ids)
    ours = ExactVectors(ids, vectors)
    for k in (1, 10, 500, 600):
        got, want = ours.search(queries, k), reference.search(queries, min(k, 500))
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        assert (got[1] == want[1]).mean() > 0.99  # only near-ties may swap
    scores, found = ours.search(vectors[3:4], 2)
    assert found[0].tolist() == sorted([ids[3], ids[7]]) and scores[0, 0] == scores[0, 1]
    passing = ids[::5]
    for allowed in (passing, Allowed.from_ids(passing)):
        s, i = ours.search_among(queries, 10, allowed)
        exact = queries @ vectors[::5].T
        best = np.argsort(-exact, axis=1)[:, :10]
        assert (i == passing[best]).all()
        np.testing.assert_allclose(s, np.take_along_axis(exact, best, axis=1), atol=1e-6)
    assert np.array_equal(ours.reconstruct(int(ids[42])), vectors[42])
    assert ours.search(queries, 0)[1].shape == (3, 0)


def test_bench_startup_times_each_command_against_the_floor(indexed: Path) -> None:
    from vqret.benchmarks.startup import COMMANDS, measure_startup, top10_agreement

    store = indexed / ".vqret"
    result = measure_startup(indexed, store, repeats=1)
    assert result["noop_index_rows"] == 20 and result["cold_search_hits"] == 10
    for name in COMMANDS:
        seconds = result[f"{name}_s"]
        assert seconds > 0 and result[f"{name}_s_min"] == seconds  # one run: median = min
        assert result[f"{name}_rss_mib"] > 0
        if name != "floor":  # a ratio of the rounded medians, up to their rounding
            ratio = result[f"{name}_x_floor"]
            floor = result["floor_s"]
            assert (seconds - 5e-4) / (floor + 5e-4) - 0.005 <= ratio <= (
                (seconds + 5e-4) / (floor - 5e-4) + 0.005)
    agreement = top10_agreement(store)
    assert agreement["same_top10"] == agreement["probe_texts"] == 10
    assert agreement["min_query_cosine"] >= 0.9999


def test_the_console_entry_builds_only_the_command_it_runs() -> None:
    from typer.main import get_command_name
    from vqret.cli.main import app, only_the_command_asked_for

    def names(group) -> list[str]:
        return [c.name or get_command_name(c.callback.__name__)
                for c in group.registered_commands]

    everything = len(app.registered_commands)
    benches = len(app.registered_groups[0].typer_instance.registered_commands)
    search = only_the_command_asked_for(app, ["-v", "search", "red car", "--store", "index"])
    assert names(search) == ["search"] and search.registered_groups == []
    bench = only_the_command_asked_for(app, ["bench", "startup", "--json"])
    assert names(bench) == [] and [g.name for g in bench.registered_groups] == ["bench"]
    assert names(bench.registered_groups[0].typer_instance) == ["startup"]
    # --help alone and a misspelt name get the whole group (its list, typer's suggestion)
    assert only_the_command_asked_for(app, ["--help"]) is app
    assert only_the_command_asked_for(app, ["serch", "x"]) is app
    # the app itself is untouched
    assert len(app.registered_commands) == everything > 5
    assert len(app.registered_groups[0].typer_instance.registered_commands) == benches > 5

    typo = subprocess.run([sys.executable, "-m", "vqret.cli.main", "serch", "x"],
                          capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "Did you mean 'search'" in typo.stderr
