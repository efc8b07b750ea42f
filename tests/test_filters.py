"""Search within: filters on folder, date, type and SQL, exact top-k among what passes, the
same on the CLI, HTTP and Python, and the SQL sandbox (no files, network, extensions, SET)."""

from __future__ import annotations

import datetime as dt
import os
import shutil

import numpy as np
import pytest
from conftest import run_cli, run_json
from fixtures.shapes import make_shape_folder
from vqret import Collection, QueryError
from vqret.retrieval.filters import Filters

pytestmark = pytest.mark.usefixtures("one_thread")
JULY = dt.datetime(2023, 7, 15, 12, tzinfo=dt.timezone.utc).timestamp()
MARCH = dt.datetime(2021, 3, 1, 12, tzinfo=dt.timezone.utc).timestamp()


@pytest.fixture(scope="module")
def trips(tmp_path_factory, embedder):
    """48 drawings in trips/2021 (March) and trips/2023/beach (July), 6 of them as JPEG."""
    root = tmp_path_factory.mktemp("filters") / "trips"
    make_shape_folder(root / "2021", 24, seed=5)
    new = make_shape_folder(root / "2023" / "beach", 24, seed=6)
    from PIL import Image

    for path, *_ in new[:6]:
        Image.open(path).convert("RGB").save(path.with_suffix(".JPG"), quality=95)
        path.unlink()
    for folder, when in ((root / "2021", MARCH), (root / "2023", JULY)):
        for path in folder.rglob("*.*"):
            os.utime(path, (when, when))
    collection = Collection.create(root, embedder=embedder)
    collection.index()
    return collection


def paths(hits) -> list[str]:
    return [h.path for h in hits]


def test_filters_check_their_input_early():
    for kwargs, message in [
        ({"after": "2023-13-01"}, "after must be a date like 2023-07-01"),
        ({"before": 20230701}, "before must be a date"),
        ({"after": "2023-08-01", "before": "2023-07-01"}, "must be earlier than before"),
        ({"types": "jpg,,png"}, "type must be file types like jpg,png"),
        ({"where": "  "}, "where must be a SQL condition"),
        ({"where": "x" * 2001}, "longer than 2000"),
        ({"min_score": "high"}, "min_score must be a number"),
        ({"folder": ""}, "folder must be a non-empty string"),
    ]:
        with pytest.raises(QueryError, match=message):
            Filters(**kwargs)
    f = Filters(after="2023-07-01", types=".JPG,png")
    assert f.types == ("jpg", "png") and f.after == dt.datetime(2023, 7, 1)  # wall-clock
    assert f.describe() == {"after": "2023-07-01T00:00:00", "types": ["jpg", "png"]}
    # an offset makes it an instant; the two kinds still order
    assert Filters(after="2023-07-01T02:00+02:00", before="2023-07-01T00:30").after.tzinfo
    with pytest.raises(QueryError, match="earlier than before"):
        Filters(after="2023-07-01T03:00+02:00", before="2023-07-01T00:30")
    assert not Filters(min_score=0.3).selects_rows and f.selects_rows


def test_each_filter_selects_the_rows_it_names(trips):
    rows = trips.store.read_table(["id", "path"]).to_pylist()
    by_id = {r["id"]: r["path"] for r in rows}

    def chosen(**kwargs) -> set[str]:
        return {by_id[int(i)] for i in trips.passing_ids(Filters(**kwargs)).unique}

    everything = set(by_id.values())
    beach = {p for p in everything if p.startswith("2023/beach/")}
    assert chosen(folder="2023") == beach == chosen(folder="2023/beach/")
    assert chosen(folder="2023/bea") == set()  # a prefix is a folder, not any string
    assert chosen(folder="*/beach/*.JPG") == {p for p in beach if p.endswith(".JPG")}
    assert chosen(types=("jpeg",)) == {p for p in everything if p.endswith(".JPG")}
    assert len(chosen(types=("jpg",))) == 6 and chosen(types=("gif",)) == set()
    # no EXIF in drawings: capture time is the file's time, here March 2021 / July 2023
    assert chosen(after="2023-07-01") == beach
    assert chosen(before="2023-07-01") == everything - beach
    assert chosen(after="2023-07-15T12:00:00+00:00", before="2023-07-16") == beach
    assert chosen(after="2023-07-15T12:00:01") == set()
    assert chosen(where="width = 64 AND path LIKE '%red%'") == {
        p for p in everything if "red" in p}
    assert chosen(where="type = 'jpg'", folder="2023") == chosen(types=("jpg",))


def test_the_top_k_is_exact_among_what_passes(trips):
    unfiltered = trips.search("a red circle", k=100)
    scores = {h.id: h.score for h in unfiltered}
    for kwargs in ({"folder": "2021"}, {"types": "jpg"}, {"where": "id % 7 = 3"}):
        allowed = set(trips.passing_ids(Filters(**kwargs)).unique.tolist())
        hits = trips.search("a red circle", k=5, **kwargs)
        assert len(hits) == min(5, len(allowed)) and {h.id for h in hits} <= allowed
        best = sorted(allowed, key=lambda i: -scores[i])[: len(hits)]
        assert [h.id for h in hits] == best
        assert np.allclose([h.score for h in hits], [scores[i] for i in best], atol=1e-5)
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    few = trips.search("a red circle", k=50, types="jpg")
    assert len(few) == 6  # fewer pass than k: all of them
    floor = trips.search("a red circle", k=50, min_score=0.5)
    assert floor and all(h.score >= 0.5 for h in floor)
    assert len(floor) == sum(s >= 0.5 for s in scores.values())


def test_nothing_passing_is_an_empty_answer_with_a_note(trips):
    hits = trips.search("a red circle", where="id < 0")
    assert list(hits) == [] and "no image passes the filters" in hits.note
    proc = run_cli("search", "a red circle", "--store", str(trips.store.path), "--where",
                   "id < 0", "--json", check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]"
    notes = proc.stderr.strip().splitlines()
    assert len(notes) == 1 and "no image passes the filters (where id < 0)" in notes[0]


def test_a_bad_where_is_one_line_and_exit_2(trips):
    for where, words in [("nosuchcolumn > 1", "nosuchcolumn"),
                         ("id >", "syntax error"),
                         ("1=1; SELECT 2", "syntax error"),
                         ("1=1) OR (1=1); SELECT (1", "several statements")]:
        proc = run_cli("search", "a red circle", "--store", str(trips.store.path), "--where",
                       where, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
        assert lines[0].startswith("error: where")
    proc = run_cli("search", "a red circle", "--store", str(trips.store.path), "--after",
                   "July", check=False)
    assert proc.returncode == 2 and "after must be a date" in proc.stderr


def test_the_same_filters_on_every_surface(trips):
    from starlette.testclient import TestClient
    from vqret.server.app import create_app

    store = str(trips.store.path)
    cli = run_json("search", "a red circle", "--store", store, "--in", "2023", "--after",
                   "2023-07-01", "--type", "jpg,png", "-k", "4")
    python = trips.search("a red circle", folder="2023", after="2023-07-01",
                          types=("jpg", "png"), k=4)
    app = create_app([("trips", trips)], warm=False)
    try:
        with TestClient(app) as client:
            body = client.post("/api/search", json={
                "q": "a red circle", "k": 4, "generate": "never",
                "filters": {"in": "2023", "after": "2023-07-01", "type": ["jpg", "png"]}}).json()
            by_get = client.get("/api/search", params={
                "q": "a red circle", "k": 4,
                "filters": '{"in": "2023", "after": "2023-07-01", "type": "jpg,png"}'}).json()
    finally:
        app.state.service.close()
    expected = [(h.id, h.score) for h in python]
    assert len(expected) == 4 and all(p.startswith("2023/") for p in paths(python))
    for rows in (cli, body["results"], by_get["results"]):
        got = [(r["id"], r["score"]) for r in rows]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
    assert body["query"]["filters"]["folder"] == "2023"


SANDBOX_ESCAPES = [
    "id IN (SELECT 1 FROM read_csv('/etc/passwd'))",
    "read_csv('/etc/passwd') IS NOT NULL",
    "1=1; COPY rows TO '/tmp/vqret-leak.csv'",
    "1=1; ATTACH '/tmp/vqret-leak.db'",
    "1=1; INSTALL httpfs",
    "1=1; LOAD httpfs",
    "1=1; SET enable_external_access = true",
    "1=1; SELECT 2",
    "1=1); SELECT (1",
    "id IN (SELECT 1 FROM read_parquet('/etc/*'))",
    "id IN (SELECT 1 FROM glob('/etc/*'))",
]


@pytest.mark.parametrize("where", SANDBOX_ESCAPES)
def test_sql_from_the_network_is_sandboxed(trips, where, tmp_path):
    from starlette.testclient import TestClient
    from vqret.server.app import create_app

    app = create_app([("trips", trips)], warm=False)
    try:
        with TestClient(app) as client:
            r = client.post("/api/search", json={"q": "a red circle", "filters":
                                                 {"where": where}})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error.startswith("where") and "\n" not in error
            assert "root:" not in r.text  # nothing of /etc/passwd came back
            # the store still answers, and the sandbox still holds, afterwards
            ok = client.post("/api/search", json={"q": "a red circle", "k": 2})
            assert ok.status_code == 200 and len(ok.json()["results"]) == 2
    finally:
        app.state.service.close()
    assert not os.path.exists("/tmp/vqret-leak.csv") and not os.path.exists(
        "/tmp/vqret-leak.db")


def test_bad_filter_fields_over_http_are_400(trips):
    from starlette.testclient import TestClient
    from vqret.server.app import create_app

    app = create_app([("trips", trips)], warm=False)
    try:
        with TestClient(app) as client:
            for filters, words in [({"wher": "id > 1"}, "unknown filter 'wher'"),
                                   ("{", "filters is not valid JSON"),
                                   ([1], "filters must be an object"),
                                   ({"after": "soon"}, "after must be a date"),
                                   ({"min_score": "x"}, "min_score must be a number")]:
                r = client.post("/api/search", json={"q": "a red circle", "filters": filters})
                assert r.status_code == 400 and words in r.json()["error"], r.text
    finally:
        app.state.service.close()


def test_filters_follow_the_store_as_it_changes(trips, tmp_path, embedder):
    copy = tmp_path / "trips"
    shutil.copytree(trips.store.root, copy, ignore=shutil.ignore_patterns(".vqret"))
    col = Collection.create(copy, embedder=embedder)
    col.index()
    before = set(col.passing_ids(Filters(folder="2021")).unique.tolist())
    shutil.rmtree(copy / "2021")
    col.index()
    assert before and col.passing_ids(Filters(folder="2021")).count == 0
    assert len(col.search("a red circle", k=100)) == 24


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_filtered_top_k_through_an_approximate_index(tmp_path, embedder, kind):
    """Whatever the index, a filtered search returns min(k, passing) results, all passing,
    and (with the exact re-check of few rows, the widened probes of many) the exact ones."""
    folder = tmp_path / "many"
    make_shape_folder(folder / "a", 150, seed=21)
    make_shape_folder(folder / "b", 150, seed=22)
    col = Collection.create(folder, embedder=embedder)
    report = col.index(index_kind=kind)
    assert report.to_dict()["index"]["kind"] == kind
    ids, vectors = col.store.vectors()
    query = col.query_embedding(text="a green star")
    exact_scores = dict(zip(ids.tolist(), (vectors @ query).tolist(), strict=True))

    def recall(hits, allowed) -> float:
        # by score, not by id: drawn shapes tie often, and any of the tied rows is right
        kth = sorted((exact_scores[i] for i in allowed), reverse=True)[: len(hits)][-1]
        return sum(exact_scores[h.id] >= kth - 1e-6 for h in hits) / len(hits)

    unfiltered = recall(col.search(embedding=query, k=10), set(exact_scores))
    for where in ("id % 100 = 7", "id % 10 = 3", "path LIKE 'a/%'", "id >= 0"):
        allowed = set(col.passing_ids(Filters(where=where)).unique.tolist())
        hits = col.search(embedding=query, k=10, where=where)
        assert len(hits) == min(10, len(allowed)) and {h.id for h in hits} <= allowed
        # as good as the index answers unfiltered (less one in ten), however few pass
        assert recall(hits, allowed) >= min(unfiltered, 0.9) - 0.1, (where, unfiltered)
