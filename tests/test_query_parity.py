"""One query engine: the same query gets the same answer from the CLI, HTTP and Python.

A table of queries (text, image, arithmetic, weights, more-like-this, a raw embedding, the
texts table, dedupe, generate auto/never/always) runs through `vqret search --json` in a fresh
process, `POST /api/search` (and `/knn-service` where clip-retrieval's API can say it), and
`vqret.Collection.search`. Good queries must give the same ids, order and scores (1e-5); bad
ones the same one-line message: exit 2 in the CLI, a 4xx `{"error"}` over HTTP, QueryError in
Python.
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from conftest import TESTS, run_cli
from fixtures.shapes import make_shape_folder

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402
from vqret import Collection, QueryError  # noqa: E402
from vqret.server.app import create_app  # noqa: E402

FIXTURE = TESTS / "fixtures" / "tiny_dit"
FAR_QUERY = "a photograph of a crowded city street at night"  # nothing like the drawings
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SCORE_TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    """A store of 120 drawings with captions, the fixture tokenizer and DiT; an image file and
    an embedding file to query with."""
    from vqret.retrieval.embedder import Embedder

    root = tmp_path_factory.mktemp("parity")
    drawn = make_shape_folder(root / "images", 120, seed=1234)
    embedder = Embedder(*tiny_clip, device="cpu", batch_size=64, num_workers=0)
    col = Collection.create(root / "images", root / "store", embedder=embedder)
    col.index()
    col.prepare_fast_text_search()  # the CLI's cold path, as `vqret index` leaves it
    captions = root / "captions.csv"
    lines = ["image,text"] + [f"{p.name},{p.stem.split('_', 1)[1].replace('_', ' ')}"
                              for p, *_ in drawn[:40]]
    captions.write_text("\n".join(lines) + "\n")
    col.index_texts(captions)
    shutil.copytree(FIXTURE / "tokenizer", root / "store" / "tokenizer")
    shutil.copytree(FIXTURE / "diffusion", root / "store" / "diffusion")
    image = root / "query.png"
    shutil.copy(drawn[5][0], image)
    ids, vectors = col.store.vectors()
    rng = np.random.default_rng(0)
    vector = vectors[list(ids).index(7)] + 0.3 * rng.standard_normal(vectors.shape[1])
    (root / "vector.json").write_text(json.dumps(vector.tolist()))
    return {"root": root, "store": root / "store", "image": image, "vector": vector.tolist(),
            "image64": base64.b64encode(image.read_bytes()).decode()}


@dataclass
class Case:
    name: str
    cli: list[str]  # after `vqret search`; {image} and {vector} are filled in
    http: dict[str, Any]  # the /api/search body; "{image64}" / "{vector}" filled in
    python: dict[str, Any]  # Collection.search kwargs; "{image}" / "{vector}" filled in
    knn: dict[str, Any] | None = None  # the /knn-service body, where it can ask the same
    generates: bool | None = None  # None: don't care (generate never)
    extra: dict[str, Any] = field(default_factory=dict)


GOOD = [
    Case("text", ["a red circle"], {"q": "a red circle"}, {"query": "a red circle"},
         knn={"text": "a red circle"}),
    Case("literal text", ["a blue square", "-k", "5"], {"text": "a blue square", "k": 5},
         {"text": "a blue square", "k": 5}, knn={"text": "a blue square", "num_images": 5}),
    Case("image", ["--image", "{image}"], {"image": "{image64}"}, {"image": "{image}"},
         knn={"image": "{image64}"}),
    Case("arithmetic", ["a red circle", "-", "a red star"], {"q": "a red circle - a red star"},
         {"query": "a red circle - a red star"}),
    Case("three terms", ["a red circle + a blue square + a green star"],
         {"q": "a red circle + a blue square + a green star"},
         {"query": "a red circle + a blue square + a green star"}),
    Case("weights", ["2:a red circle", "+", "0.5:a green star"],
         {"q": "2:a red circle + 0.5:a green star"},
         {"query": "2:a red circle + 0.5:a green star"}),
    Case("quoted terms", ['"a purple triangle" - "a purple square"'],
         {"q": '"a purple triangle" - "a purple square"'},
         {"query": '"a purple triangle" - "a purple square"'}),
    Case("subtract flag", ["a red circle", "--subtract", "0.5:a orange circle"],
         {"q": "a red circle - 0.5:a orange circle"},
         {"query": "a red circle - 0.5:a orange circle"}),
    Case("negative only", ["-", "a red circle"], {"q": "- a red circle"},
         {"query": "- a red circle"}),
    Case("text and weighted image", ["a blue star", "--add", "0.5:{image}"],
         {"terms": [{"text": "a blue star"}, {"image": "{image64}", "weight": 0.5}]},
         {"query": "a blue star + 0.5:{image}"}),
    Case("like", ["--like", "5", "-k", "6"], {"like": 5, "k": 6}, {"like": 5, "k": 6}),
    Case("like minus text", ["--like", "5", "-", "a red star"],
         {"terms": [{"like": 5}, {"text": "a red star", "weight": -1}]},
         {"query": "- a red star", "like": 5}),
    Case("embedding", ["--embedding", "{vector}"], {"embedding": "{vector}"},
         {"embedding": "{vector}"}, knn={"embedding_input": "{vector}"}),
    Case("texts table", ["a red circle", "--texts", "-k", "4"],
         {"q": "a red circle", "table": "texts", "k": 4},
         {"query": "a red circle", "texts": True, "k": 4},
         knn={"text": "a red circle", "modality": "text", "num_images": 4}),
    Case("texts table by image", ["--image", "{image}", "--texts", "-k", "3"],
         {"image": "{image64}", "table": "texts", "k": 3},
         {"image": "{image}", "texts": True, "k": 3}),
    Case("dedupe", ["a red circle", "--dedupe", "-k", "8"],
         {"q": "a red circle", "dedupe": True, "k": 8},
         {"query": "a red circle", "dedupe": True, "k": 8},
         knn={"text": "a red circle", "deduplicate": True, "num_images": 8,
              "num_result_ids": 40}),
    Case("generate never", [FAR_QUERY, "--generate", "never"],
         {"q": FAR_QUERY, "generate": "never"}, {"query": FAR_QUERY, "generate": "never"},
         generates=False),
    Case("generate auto, a miss", [FAR_QUERY, "--generate", "auto", "--threshold", "0.95"],
         {"q": FAR_QUERY, "generate": "auto", "threshold": 0.95},
         {"query": FAR_QUERY, "generate": "auto", "threshold": 0.95}, generates=True),
    Case("generate auto, a match", ["a red circle", "--generate", "auto"],
         {"q": "a red circle", "generate": "auto"},
         {"query": "a red circle", "generate": "auto"}, generates=False),
    Case("generate always", ["a green square", "--generate", "always", "--seed", "3"],
         {"q": "a green square", "generate": "always", "seed": 3},
         {"query": "a green square", "generate": "always", "seed": 3}, generates=True),
    Case("generate always, arithmetic", ["a green square - a green circle", "--generate",
                                         "always"],
         {"q": "a green square - a green circle", "generate": "always"},
         {"query": "a green square - a green circle", "generate": "always"}, generates=True),
]

BAD = [
    # (name, cli args, http body, python kwargs, message, http status)
    ("empty", [""], {"q": ""}, {"query": ""}, "empty query: give some text to search for",
     400),
    ("dangling sign", ["a red circle -"], {"q": "a red circle -"}, {"query": "a red circle -"},
     "nothing after '-' in 'a red circle -'", 400),
    ("two signs", ["a red circle + + a star"], {"q": "a red circle + + a star"},
     {"query": "a red circle + + a star"}, "nothing after '+'", 400),
    ("zero weight", ["0:a red circle"], {"q": "0:a red circle"}, {"query": "0:a red circle"},
     "weight must be a finite, non-zero number, not 0", 400),
    ("cancelling terms", ["a red circle - a red circle"], {"q": "a red circle - a red circle"},
     {"query": "a red circle - a red circle"}, "the terms cancel out", 400),
    ("k zero", ["a red circle", "-k", "0"], {"q": "a red circle", "k": 0},
     {"query": "a red circle", "k": 0}, "k must be an integer, 1 or more, not 0", 400),
    ("generate maybe", ["a red circle", "--generate", "maybe"],
     {"q": "a red circle", "generate": "maybe"}, {"query": "a red circle", "generate": "maybe"},
     "generate must be auto, never or always, not 'maybe'", 400),
    ("too long", ["x" * 1001], {"q": "x" * 1001}, {"query": "x" * 1001},
     "a text term is longer than 1000 characters", 400),
    ("wrong dimension", ["--embedding", "{short}"], {"embedding": [1.0, 2.0, 3.0]},
     {"embedding": [1.0, 2.0, 3.0]}, "embedding has 3 numbers; this store has 64", 400),
    ("dedupe texts", ["a red circle", "--texts", "--dedupe"],
     {"q": "a red circle", "table": "texts", "dedupe": True},
     {"query": "a red circle", "texts": True, "dedupe": True},
     "dedupe applies to image results, not to the texts table", 400),
    ("unknown like id", ["--like", "99999"], {"like": 99999}, {"like": 99999},
     "no image with id 99999 in this store", 404),
]


def fill(value: Any, world: dict, surface: str) -> Any:
    """Put the world's files into a case: paths for CLI/Python, base64 for HTTP."""
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return value
    if isinstance(value, list):
        return [fill(v, world, surface) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, world, surface) for k, v in value.items()}
    if value == "{vector}":
        return str(world["root"] / "vector.json") if surface == "cli" else world["vector"]
    if value == "{image64}":
        return world["image64"]
    if isinstance(value, str) and "{image}" in value:
        return value.replace("{image}", str(world["image"]))
    if value == "{short}":
        path = world["root"] / "short.json"
        path.write_text("[1, 2, 3]")
        return str(path)
    return value


@pytest.fixture(scope="module")
def client(world):
    app = create_app([("shapes", world["store"])], device="cpu", warm=False)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def python_collection(world):
    return Collection.open(world["store"], device="cpu")


def cli_search(world, args: list[str]):
    return run_cli("search", *fill(args, world, "cli"), "--store", str(world["store"]),
                   "--json", check=False, env=ONE_THREAD)


def rows_of(rows: list[dict]) -> tuple[list[tuple], dict | None]:
    hits = [(r["rank"], r["id"], r["score"]) for r in rows if not r.get("generated")]
    generated = [r["generated"] for r in rows if r.get("generated")]
    return hits, (generated[0] if generated else None)


def same_hits(a: list[tuple], b: list[tuple], what: str) -> None:
    assert [(rank, i) for rank, i, _ in a] == [(rank, i) for rank, i, _ in b], what
    assert np.allclose([s for *_, s in a], [s for *_, s in b], atol=SCORE_TOLERANCE,
                       rtol=0), what


def same_generated(a: dict | None, b: dict | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is None:
        return
    for key in ("prompt", "seed", "mode", "threshold_source", "codes_shape"):
        assert a[key] == b[key], (what, key)
    for key in ("best_score", "threshold", "clip_score"):
        assert abs(a[key] - b[key]) <= 1e-4, (what, key, a[key], b[key])


@pytest.mark.parametrize("case", GOOD, ids=[c.name for c in GOOD])
def test_a_good_query_gets_the_same_answer_everywhere(case, world, client, python_collection):
    proc = cli_search(world, case.cli)
    assert proc.returncode == 0, proc.stderr
    cli_hits, cli_generated = rows_of(json.loads(proc.stdout))

    response = client.post("/api/search", json={"k": 10, **fill(case.http, world, "http")})
    assert response.status_code == 200, response.text
    body = response.json()
    http_hits = [(r["rank"], r["id"], r["score"]) for r in body["results"]]
    http_generated = body["generated"]

    kwargs = fill(case.python, world, "python")
    if "embedding" in kwargs:
        kwargs["embedding"] = np.asarray(kwargs["embedding"])
    results = python_collection.search(**kwargs)
    python_hits = [(r.rank, r.id, r.score) for r in results]

    assert cli_hits, "a good query finds something"
    same_hits(cli_hits, http_hits, f"{case.name}: CLI vs HTTP")
    same_hits(cli_hits, python_hits, f"{case.name}: CLI vs Python")
    if case.generates is not None:
        assert (cli_generated is not None) == case.generates, proc.stderr
        same_generated(cli_generated, http_generated, f"{case.name}: CLI vs HTTP")
        same_generated(cli_generated, results.generated, f"{case.name}: CLI vs Python")
        if case.generates:
            assert http_generated["url"].startswith("/generated/shapes/")
            png = client.get(http_generated["url"])
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    if case.knn is not None:
        knn = client.post("/knn-service", json={"indice_name": "shapes", "num_images": 10,
                                                **fill(case.knn, world, "http")})
        assert knn.status_code == 200, knn.text
        knn_hits = [(rank, r["id"], r["similarity"]) for rank, r in
                    enumerate(knn.json(), start=1)]
        same_hits(cli_hits, knn_hits, f"{case.name}: CLI vs /knn-service")


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_bad_query_gets_the_same_message_everywhere(case, world, client, python_collection):
    name, cli_args, http_body, python_kwargs, message, status = case
    proc = cli_search(world, cli_args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    cli_message = lines[0].removeprefix("error: ")

    response = client.post("/api/search", json=http_body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == cli_message

    kwargs = dict(python_kwargs)
    if isinstance(kwargs.get("embedding"), list):
        kwargs["embedding"] = np.asarray(kwargs["embedding"])
    with pytest.raises(QueryError) as raised:
        python_collection.search(**kwargs)
    assert str(raised.value) == cli_message


def test_the_parity_table_covers_what_the_issue_asks(world):
    """At least 20 queries of every kind, and 8 bad ones."""
    assert len(GOOD) >= 20 and len(BAD) >= 8
    http_kinds = {k for case in GOOD for k in case.http} | {
        t for case in GOOD for item in case.http.get("terms", []) for t in item}
    assert {"q", "text", "image", "like", "embedding", "terms", "table", "dedupe",
            "generate"} <= http_kinds
    assert {c.generates for c in GOOD} == {None, True, False}
