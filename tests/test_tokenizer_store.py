"""Code grids in the store: `vqret tokenizer train --store`, `encode`, `decode`, `vqret dupes`.

One module-scoped store (48 drawn shapes, indexed with the tiny CLIP) gets a tiny tokenizer
trained on its images by `vqret tokenizer train --store` in a fresh process (~25 s); every
test works on its own copy of that folder. The other commands run in-process through typer
(registered on a fresh app, as cli/main.py registers them), except one `vqret dupes` run
through the real entry point.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from conftest import run_json
from fixtures.shapes import draw_shape, make_shape_folder
from PIL import Image
from typer.testing import CliRunner
from vqret import Collection
from vqret.cli import dupes as dupes_cli
from vqret.cli.tokenizer import register as register_tokenizer
from vqret.retrieval import dupes as dupes_lib
from vqret.retrieval.dupes import candidate_pairs
from vqret.retrieval.embedder import ModelSpec
from vqret.retrieval.index import index_files, load_saved, read_meta
from vqret.retrieval.store import Store, embeddings_to_arrow
from vqret.tokenizer.api import Tokenizer
from vqret.tokenizer.checkpoint import load_checkpoint, save_checkpoint

N_IMAGES = 48
TRAIN_STEPS = 150  # ~20 s on one core; copies of an image keep >= 84% of their codes


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory, embedder) -> Path:
    """A folder of drawings with its store and the store's own tokenizer (STORE/tokenizer)."""
    root = tmp_path_factory.mktemp("tokstore")
    folder = root / "photos"
    make_shape_folder(folder, N_IMAGES, seed=1234)
    Collection.create(folder, embedder=embedder).index()
    report = run_json(
        "tokenizer", "train", "--store", str(folder / ".vqret"), "--preset", "tiny",
        "--steps", str(TRAIN_STEPS), "-b", "16", "--lr", "2e-3", "--device", "cpu",
        "--threads", "1",
    )
    # by default the checkpoint goes into the store, where encode/decode/dupes look for it
    assert Path(report["out"]).resolve() == (folder / ".vqret" / "tokenizer").resolve()
    assert report["train_images"] + report["held_out_images"] == N_IMAGES
    return folder


@pytest.fixture
def photos(base, tmp_path) -> Path:
    """This test's own copy of the folder, store and tokenizer (mtimes kept: nothing to
    re-index)."""
    return Path(shutil.copytree(base, tmp_path / "photos"))


def make_app() -> typer.Typer:
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register_tokenizer(app, bench)
    dupes_cli.register(app)
    return app


def invoke(*args: str):
    return CliRunner().invoke(make_app(), list(args))


def invoke_json(*args: str) -> dict:
    import json

    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows_of(folder: Path) -> dict[str, dict]:
    table = Store(folder / ".vqret").read_table(["id", "path", "codes", "codes_tokenizer"])
    return {r["path"]: r for r in table.to_pylist()}


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in " ".join(lines[0].split()), lines[0]


# ------------------------------------------------------------------------------------------
# encode / decode
# ------------------------------------------------------------------------------------------


def test_codes_round_trip_through_parquet_and_decode(photos, monkeypatch):
    store_path = photos / ".vqret"
    first = invoke_json("tokenizer", "encode", "--store", str(store_path))
    assert (first["encoded"], first["skipped"], first["failed"]) == (N_IMAGES, 0, [])
    tok = Tokenizer.load(store_path / "tokenizer", device="cpu")
    assert first["tokenizer"] == tok.id and first["grid"] == [8, 8]

    # Parquet as any reader sees it: list<uint16>, row-major grids, tagged with the id
    table = pq.read_table(store_path / "images")
    assert table.schema.field("codes").type == pa.list_(pa.uint16())
    rows = table.select(["id", "path", "codes", "codes_tokenizer"]).to_pylist()
    assert {r["codes_tokenizer"] for r in rows} == {tok.id}
    stored = np.array([r["codes"] for r in rows], dtype=np.uint16).reshape(-1, 8, 8)
    in_memory = tok.encode([str(photos / r["path"]) for r in rows])  # same batch, same order
    np.testing.assert_array_equal(stored, in_memory)

    # decode by id, and by path from inside the folder (store found upwards)
    pick = rows[5]
    out = photos.parent / "rebuilt.png"
    result = invoke("tokenizer", "decode", "--id", str(pick["id"]), "-o", str(out),
                    "--store", str(store_path))
    assert result.exit_code == 0, result.output
    expected = tok.decode(in_memory[5])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), expected)
    monkeypatch.chdir(photos)
    out2 = photos.parent / "rebuilt-by-path.png"
    assert invoke("tokenizer", "decode", "--path", pick["path"], "-o", str(out2)).exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out2)), expected)
    # the rebuilt picture resembles the drawing (the tokenizer learned something)
    original = np.asarray(Image.open(photos / pick["path"]).convert("RGB").resize((32, 32)))
    mse = np.mean((original.astype(float) - expected.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 15

    # a second run has nothing to do; the manifest says which tokenizer made the codes
    again = invoke_json("tokenizer", "encode")
    assert (again["encoded"], again["skipped"]) == (0, N_IMAGES)
    record = Store(store_path).manifest["tokenizer"]
    assert record["id"] == tok.id and record["grid"] == [8, 8]
    assert record["path"] == "tokenizer/tokenizer.safetensors"  # relative: moves with it


def test_encode_is_incremental_across_index_changes(photos, embedder):
    col = Collection(Store(photos / ".vqret"), embedder)
    assert col.encode_codes().encoded == N_IMAGES
    before = rows_of(photos)
    names = sorted(before)
    renamed, copied, modified, deleted = names[0], names[1], names[2], names[3]
    (photos / renamed).rename(photos / "renamed.png")
    shutil.copy2(photos / copied, photos / "copy.png")
    draw_shape("purple", "star", np.random.default_rng(7)).save(photos / modified)
    (photos / deleted).unlink()
    make_shape_folder(photos / "new", 2, seed=99)
    report = col.index()
    assert (report.renamed, report.removed, report.updated, report.added) == (1, 1, 1, 3)

    after = rows_of(photos)
    # renames and copies keep their codes (same bytes); modified content drops them
    assert after["renamed.png"]["id"] == before[renamed]["id"]
    assert after["renamed.png"]["codes"] == before[renamed]["codes"]
    assert after["copy.png"]["codes"] == before[copied]["codes"] is not None
    assert after["copy.png"]["codes_tokenizer"] == before[copied]["codes_tokenizer"]
    assert after[modified]["id"] == before[modified]["id"]
    assert after[modified]["codes"] is None
    new = sorted(p for p in after if p.startswith("new/"))
    assert len(new) == 2 and all(after[p]["codes"] is None for p in new)

    todo = [p for p, r in after.items() if r["codes"] is None]  # the store's order
    assert col.info()["codes"]["encoded"] == len(after) - 3  # `vqret info` counts them
    tok = col.tokenizer(device="cpu")
    expected = tok.encode([str(photos / p) for p in todo])
    result = invoke_json("tokenizer", "encode", "--store", str(photos))
    assert result["encoded"] == 3 and result["skipped"] == len(after) - 3
    final = rows_of(photos)
    for path, grid in zip(todo, expected, strict=True):
        assert final[path]["codes"] == grid.reshape(-1).tolist()
        assert final[path]["codes_tokenizer"] == tok.id
    assert final[modified]["codes"] != before[modified]["codes"]
    assert final["renamed.png"]["codes"] == before[renamed]["codes"]
    codes = run_json("info", "--store", str(photos))["codes"]
    assert codes["encoded"] == len(after) and codes["tokenizer"] == tok.id[:12]
    assert codes["grid"] == [tok.grid_size, tok.grid_size]


def test_unreadable_images_cost_one_line_each_and_the_rest_is_encoded(photos):
    names = sorted(rows_of(photos))
    (photos / names[4]).write_bytes(b"this is not a picture")  # broken after indexing
    (photos / names[9]).unlink()  # gone since indexing
    result = invoke("tokenizer", "encode", "--store", str(photos), "--json")
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.stdout)
    assert report["encoded"] == N_IMAGES - 2
    assert sorted(f["path"] for f in report["failed"]) == [names[4], names[9]]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2 and "Traceback" not in result.output
    assert any(names[4] in line for line in skipped) and any(names[9] in line for line in skipped)
    rows = rows_of(photos)
    assert rows[names[4]]["codes"] is None and rows[names[9]]["codes"] is None
    assert sum(r["codes"] is not None for r in rows.values()) == N_IMAGES - 2
    # a fixed file is picked up by the next run; the rest is skipped
    shutil.copy2(photos / names[5], photos / names[4])
    again = invoke_json("tokenizer", "encode", "--store", str(photos))
    assert again["encoded"] == 1 and again["skipped"] == N_IMAGES - 2
    assert [f["path"] for f in again["failed"]] == [names[9]]


def test_search_is_unchanged_by_encode_and_the_index_is_not_touched(photos, embedder):
    store = Store(photos / ".vqret")
    col = Collection(store, embedder)
    queries = [{"text": "a red circle"}, {"text": "a blue square"},
               {"image": photos / sorted(rows_of(photos))[7]}]
    before = [col.search(**q, k=10) for q in queries]
    faiss_file = index_files(store)[0]
    stamp, meta = faiss_file.stat().st_mtime_ns, read_meta(store)

    col.encode_codes()
    store.refresh()
    after = [col.search(**q, k=10) for q in queries]
    assert after == before  # same ids, paths and scores, in the same order
    assert faiss_file.stat().st_mtime_ns == stamp  # nothing rewritten
    assert read_meta(store)["generation"] == store.table_generation() == meta["generation"]
    saved = load_saved(store)  # the saved index still covers the store: no rebuild
    assert saved is not None and saved[0].ntotal == len(store)

    # a later index run that replaces a row (remove + add, same id) leaves one vector per id
    target = sorted(rows_of(photos))[7]
    draw_shape("orange", "circle", np.random.default_rng(3)).save(photos / target)
    col.index()
    index, _ = load_saved(store)
    ids = faiss.vector_to_array(faiss.downcast_index(index).id_map)
    assert len(ids) == len(set(ids)) == len(store)
    hits = col.search(image=photos / target, k=len(store))
    assert [h.path for h in hits].count(target) == 1 and hits[0].path == target


def test_encode_takes_the_writer_lock_like_index(photos):
    store = Store(photos / ".vqret")
    with store.writer():  # a `vqret index` is running
        one_line_error(invoke("tokenizer", "encode", "--store", str(photos)),
                       "is writing to this store", "--wait")
    assert all(r["codes"] is None for r in rows_of(photos).values())
    # and while encode holds it, an indexer can't start
    col = Collection(store)
    started = {}

    def on_progress(done: int, total: int) -> None:
        if "locked" not in started:
            from vqret.retrieval.store import StoreLockedError

            with pytest.raises(StoreLockedError):
                Store(store.path).writer()
            started["locked"] = True

    assert col.encode_codes(on_progress=on_progress).encoded == N_IMAGES
    assert started == {"locked": True}
    Store(store.path).writer().close()  # released afterwards


def test_a_killed_encode_keeps_its_commits_and_the_next_run_resumes(photos):
    store = Store(photos / ".vqret")
    tok = Tokenizer.load(store.path / "tokenizer", device="cpu", batch_size=8)
    from vqret.tokenizer.store_codes import encode_store

    def kill_at_24(done: int, total: int) -> None:
        if done >= 24:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_store(store, tok, commit_every=16, on_progress=kill_at_24)
    rows = rows_of(photos)
    assert sum(r["codes"] is not None for r in rows.values()) == 16  # one commit of 16
    resumed = encode_store(Store(store.path), tok)  # the lock was released
    assert (resumed.encoded, resumed.skipped) == (N_IMAGES - 16, 16)


def test_update_columns_sets_values_by_id_and_keeps_vectors(tmp_path):
    spec = ModelSpec(model="m", pretrained="none", weights_id="none", embed_dim=4)
    (tmp_path / "p").mkdir()
    store = Store.create(tmp_path / "p" / ".vqret", spec, tmp_path / "p")
    vectors = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    rows = pa.table({"id": pa.array(range(5), pa.int64()), "path": [f"{i}.png" for i in range(5)],
                     "embedding": embeddings_to_arrow(vectors)})
    with store.writer() as w:
        w.commit(rows.slice(0, 3))
        w.commit(rows.slice(3))  # two parts
    generation = store.table_generation()
    update = pa.table({"id": pa.array([4, 1, 77], pa.int64()),
                       "codes": pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.uint16())),
                       "codes_tokenizer": ["t", "t", "t"]})
    with store.writer() as w:
        assert w.update_columns(update, tokenizer={"id": "t"}) == 2  # 77: not a row
        with pytest.raises(ValueError, match="embedding"):
            w.update_columns(pa.table({"id": [0], "embedding": embeddings_to_arrow(vectors[:1])}))
        with pytest.raises(ValueError, match="twice"):
            w.update_columns(pa.table({"id": [0, 0], "codes_tokenizer": ["a", "b"]}))
    store = Store(store.path)
    got = store.read_table(["id", "codes", "codes_tokenizer"]).to_pylist()
    assert [r["id"] for r in got] == [0, 1, 2, 3, 4]  # order and ids kept
    assert [r["codes"] for r in got] == [None, [3, 4], None, None, [1, 2]]
    assert [r["codes_tokenizer"] for r in got] == [None, "t", None, None, "t"]
    np.testing.assert_array_equal(store.vectors()[1], vectors)
    assert store.table_generation() == generation  # the search index stays valid
    assert store.manifest["tokenizer"] == {"id": "t"} and len(store) == 5


def test_decode_errors_are_clear(photos, tmp_path):
    s = str(photos / ".vqret")
    one_line_error(invoke("tokenizer", "decode", "--id", "0", "-o", str(tmp_path / "a.png"),
                          "--store", s), "has no codes yet", "vqret tokenizer encode")
    one_line_error(invoke("dupes", "--store", s), "no image has codes yet")
    invoke_json("tokenizer", "encode", "--store", s)
    one_line_error(invoke("tokenizer", "decode", "--id", "99999", "-o", str(tmp_path / "a.png"),
                          "--store", s), "no image with id 99999")
    one_line_error(invoke("tokenizer", "decode", "--path", "nope.png", "-o",
                          str(tmp_path / "a.png"), "--store", s), "no image with path nope.png")
    one_line_error(invoke("tokenizer", "decode", "-o", str(tmp_path / "a.png"), "--store", s),
                   "give --id N or --path P")

    # another tokenizer (same shape, other weights): its id doesn't match the stored codes
    model = load_checkpoint(photos / ".vqret" / "tokenizer")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    other = save_checkpoint(model, tmp_path / "other")
    result = invoke("tokenizer", "decode", "--id", "0", "-o", str(tmp_path / "a.png"),
                    "--store", s, "--tokenizer", str(other.parent))
    own = Tokenizer.load(photos / ".vqret" / "tokenizer", device="cpu").id
    one_line_error(result, f"was encoded by tokenizer {own[:12]}", "not by")
    assert not (tmp_path / "a.png").exists()

    shutil.rmtree(photos / ".vqret" / "tokenizer")
    one_line_error(invoke("tokenizer", "encode", "--store", s), "has no tokenizer",
                   "vqret tokenizer train --store")
    one_line_error(invoke("tokenizer", "train", "--images", str(photos), "--store", s,
                          "--steps", "1"), "not both")


# ------------------------------------------------------------------------------------------
# dupes
# ------------------------------------------------------------------------------------------


def test_dupes_finds_a_resaved_and_a_resized_copy_but_not_unrelated_images(photos, embedder):
    names = sorted(rows_of(photos))
    original = names[7]  # a green star
    image = Image.open(photos / original).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=60)
    (photos / "resaved.jpg").write_bytes(buffer.getvalue())
    image.resize((58, 58), Image.Resampling.BICUBIC).save(photos / "smaller.png")
    same_class = names[7 + 24]  # another green star: the tiny CLIP sees the same thing
    other_class = names[8]
    col = Collection(Store(photos / ".vqret"), embedder)
    col.index()
    col.encode_codes()

    # The tiny CLIP puts every drawing of a class near one point (cosine up to 0.994 between
    # different drawings) and the tiny tokenizer's 64 codes share backgrounds (up to 44% of
    # a grid): measured copies score cosine >= 0.9997 and >= 84% of codes (tokenizer trained
    # in bf16 or fp32), so the fixture needs tighter thresholds than the defaults, which are
    # meant for real models.
    strict = invoke_json("dupes", "--store", str(photos), "--threshold", "0.995",
                         "--codes-threshold", "0.6")
    groups = [set(g["paths"]) for g in strict["groups"]]
    assert groups == [{original, "resaved.jpg", "smaller.png"}]
    group = strict["groups"][0]
    assert group["paths"][0] == original and group["similarity"][0] == 1.0
    assert all(s >= 0.995 for s in group["similarity"])
    assert all(c >= 0.6 for c in group["codes_match"])
    assert strict["images"] == N_IMAGES + 2 and strict["without_codes"] == 0
    assert strict["candidates"] < (N_IMAGES + 2) * (N_IMAGES + 1) / 2  # not all pairs

    # the real entry point, default thresholds: the copies are found there too
    default = run_json("dupes", "--store", str(photos / ".vqret"))
    mine = [set(g["paths"]) for g in default["groups"] if original in g["paths"]]
    assert len(mine) == 1 and {"resaved.jpg", "smaller.png"} <= mine[0]
    assert other_class not in mine[0]
    table = invoke("dupes", "--store", str(photos), "--threshold", "0.995",
                   "--codes-threshold", "0.6")
    assert table.exit_code == 0 and "resaved.jpg" in table.stdout
    assert same_class not in table.stdout and "1 groups, 2 duplicates" in table.stdout


def test_lsh_candidates_find_pairs_that_share_a_third_of_their_codes():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1024, size=(3000, 256)).astype(np.uint16)
    planted = []
    for k, share in enumerate([0.3, 0.5, 0.9] * 10):
        i, j = 2 * k, 2 * k + 1
        same = rng.random(256) < share
        codes[j, same] = codes[i, same]
        planted.append((i, j))
    pairs = {tuple(p) for p in candidate_pairs(codes).tolist()}
    found = sum(p in pairs for p in planted)
    assert found >= 27  # 1 - (1 - 0.3^2)^32 = 0.95 at the lowest share
    assert len(pairs) < 3000 * 2999 / 2 / 1000  # a few random collisions, not all pairs

    # 500 identical grids: one cluster, found with a chain of pairs, not all 124,750 of them
    same = np.zeros((500, 16), np.uint16)
    chain = candidate_pairs(same)
    assert len(chain) <= 500 * 4
    assert dupes_lib._components(500, chain) == [list(range(500))]
    same[1] = same[0] = 7  # two others, alike: a small bucket of their own
    assert [0, 1] in candidate_pairs(same).tolist()

    # a shared flat background (200 of 256 positions): big buckets are split by more
    # positions, so the images aren't all paired with each other
    background = rng.integers(0, 1024, size=(2000, 256)).astype(np.uint16)
    background[:, :200] = 0
    pairs = candidate_pairs(background)
    assert len(pairs) < 2000 * 1999 / 2 / 20


def test_cli_defaults_are_the_library_defaults():
    assert dupes_cli.THRESHOLD == dupes_lib.THRESHOLD
    assert dupes_cli.CODES_THRESHOLD == dupes_lib.CODES_THRESHOLD
    assert dupes_cli.BANDS == dupes_lib.BANDS and dupes_cli.MAX_BUCKET == dupes_lib.MAX_BUCKET
