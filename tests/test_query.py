"""The query: rclip's syntax, the weighted sum, the checks every surface shares, and what the
server adds (no files named by a request, URLs only when allowed, one drawing at a time)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from vqret import Collection, Query, QueryError, Term
from vqret.retrieval.query import combine, parse_terms


def read(text: str, **kwargs) -> list[tuple[str, object, float]]:
    return [(t.kind, t.value, t.weight) for t in parse_terms(text, **kwargs)]


def test_rclip_syntax():
    assert read("cat - grass + 2:./dog.jpg") == [
        ("text", "cat", 1.0), ("text", "grass", -1.0), ("image", "./dog.jpg", 2.0)]
    assert read('"a red car" - "0.5:a blue car"') == [
        ("text", "a red car", 1.0), ("text", "0.5:a blue car", -1.0)]  # quotes keep it text
    assert read("0.5:a red car") == [("text", "a red car", 0.5)]
    assert read("- grass") == [("text", "grass", -1.0)]  # a leading sign
    assert read("t-shirt -grass +1") == [("text", "t-shirt -grass +1", 1.0)]  # no spaces: text
    assert read("/abs/x.png + ../up.png + ~/home.png") == [
        ("image", "/abs/x.png", 1.0), ("image", "../up.png", 1.0),
        ("image", str(__import__("pathlib").Path("~/home.png").expanduser()), 1.0)]
    assert read("file:///tmp/a%20b.jpg") == [("image", "/tmp/a b.jpg", 1.0)]
    assert read("3:https://example.com/x.jpg") == [("image_url", "https://example.com/x.jpg",
                                                    3.0)]
    assert read("10:30 train") == [("text", "30 train", 10.0)]  # N: is always a weight
    # the CLI's arguments are the same syntax, joined
    assert read(["cat", "-", "grass"]) == read("cat - grass")


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty query"),
    ("   ", "empty query"),
    ("cat -", "nothing after '-'"),
    ("cat + + dog", r"nothing after '\+'"),
    ("0:cat", "non-zero"),
    ("2:", "nothing after the weight"),
    ("x" * 1001, "longer than 1000"),
])
def test_bad_syntax_is_one_clear_line(text, message):
    with pytest.raises(QueryError, match=message) as raised:
        parse_terms(text)
    assert "\n" not in str(raised.value) and raised.value.status == 400


def test_where_files_and_urls_are_not_allowed():
    with pytest.raises(QueryError, match="can't name a file on the server") as raised:
        parse_terms("cat + ./secret.png", files=False)
    assert raised.value.status == 400
    with pytest.raises(QueryError, match="--allow-url-queries") as raised:
        parse_terms("https://example.com/x.jpg", urls=False)
    assert raised.value.status == 403


def test_the_weighted_sum_is_renormalised():
    a, b = np.array([3.0, 0, 0]), np.array([0, 0.5, 0])  # any norms: each term is normalised
    v = combine(np.stack([a, b]), [1.0, -1.0])
    assert np.allclose(v, np.array([1, -1, 0]) / np.sqrt(2)) and v.dtype == np.float32
    # weights are relative: 2:a + 2:b is a + b; one term of any weight is that term
    assert np.allclose(combine(np.stack([a, b]), [2, 2]), combine(np.stack([a, b]), [1, 1]))
    assert np.allclose(combine(a[None], [0.3]), [1, 0, 0])
    assert np.allclose(combine(a[None], [-2]), [-1, 0, 0])
    with pytest.raises(QueryError, match="cancel out"):
        combine(np.stack([a, a]), [1, -1])


def test_a_query_checks_its_settings_early():
    terms = (Term.text("cat"),)
    for settings, message in [
        ({"k": 0}, "k must be an integer, 1 or more, not 0"),
        ({"k": True}, "k must be"),
        ({"table": "videos"}, "table must be images or texts"),
        ({"generate": "maybe"}, "generate must be auto, never or always, not 'maybe'"),
        ({"table": "texts", "dedupe": True}, "dedupe applies to image results"),
        ({"table": "texts", "generate": "always"}, "can't answer the texts table"),
        ({"threshold": "high"}, "threshold must be a number"),
    ]:
        with pytest.raises(QueryError, match=message):
            Query(terms, **settings)
    with pytest.raises(QueryError, match="empty query"):
        Query(())
    with pytest.raises(QueryError, match="weight must be a finite, non-zero number"):
        Term.text("cat", float("nan"))
    with pytest.raises(QueryError, match="like must be an image id"):
        Term.like(-3)
    query = Query((Term.text("cat"), Term.text("grass", -0.5), Term.like(4)), k=3)
    assert query.prompt == "cat - 0.5:grass + like 4" and query.like_ids == [4]
    assert query.single_text is None and Query(terms).single_text == "cat"
    assert query.describe()["terms"][1] == {"type": "text", "weight": -0.5, "text": "grass"}


def test_python_arguments_are_checked_before_any_model_loads(tmp_path, embedder):
    from serve_helpers import index_shapes

    collection, _ = index_shapes(tmp_path / "shapes", embedder, n=12)
    store = collection.store.path
    with pytest.raises(TypeError, match="devcie"):
        Collection.open(store, devcie="cuda")
    with pytest.raises(ValueError, match="precision must be one of"):
        Collection.open(store, precision="fp64")
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        Collection.open(store, batch_size=0)
    with pytest.raises(TypeError):
        Collection.create(tmp_path / "shapes", batchsize=3)
    col = Collection.open(store, device="cpu")
    assert col._embedder is None, "nothing loaded a model"
    with pytest.raises(TypeError, match="dedup"):
        col.search("a red circle", dedup=True)


def test_python_search_takes_syntax_an_explicit_query_and_keywords(tmp_path, embedder):
    from serve_helpers import index_shapes

    collection, _ = index_shapes(tmp_path / "shapes", embedder, n=24)
    col = Collection.open(collection.store.path, embedder=embedder)
    by_syntax = col.search("a red circle - 0.5:a red square", k=5)
    explicit = col.search(Query((Term.text("a red circle"), Term.text("a red square", -0.5)),
                                k=5))
    assert [(h.id, h.score) for h in by_syntax] == [(h.id, h.score) for h in explicit]
    assert by_syntax.query.describe()["terms"][1]["weight"] == -0.5
    assert by_syntax.generated is None
    # the terms really count: subtracting squares pushes red squares down
    plain = col.search(text="a red circle", k=24)
    minus = col.search("a red circle - a red square", k=24)
    square_rank = [next(h.rank for h in hits if "red_square" in h.path)
                   for hits in (plain, minus)]
    assert square_rank[1] > square_rank[0]
    # "more like this" never returns the image itself
    assert all(h.id != 3 for h in col.search(like=3, k=10))
    # a literal text is not parsed
    assert col.search(text="a red circle - a red square", k=1).query.terms[0].value == (
        "a red circle - a red square")


def test_the_server_draws_one_at_a_time_and_sheds_load_with_503():
    """GenerationQueue: one drawing runs, `max_waiting` wait, more are refused at once."""
    from vqret.server.inputs import RequestError
    from vqret.server.served_store import GenerationQueue

    queue = GenerationQueue("photos", max_waiting=1, retry_after_s=7)
    release = threading.Event()
    started = threading.Event()
    running = []

    def draw():
        running.append(1)
        started.set()
        assert len(running) == 1, "two drawings at once"
        release.wait(timeout=300)
        running.pop()
        return {"drawn": True}

    answers: list = []
    first = threading.Thread(target=lambda: answers.append(queue.run(draw)))
    first.start()
    assert started.wait(timeout=300)
    second = threading.Thread(target=lambda: answers.append(queue.run(draw)))
    second.start()
    # the third finds the one running and the one waiting: refused without waiting
    while queue._slots._value > 0:  # the second has taken its slot
        threading.Event().wait(0.01)
    with pytest.raises(RequestError) as refused:
        queue.run(draw)
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "7"}
    assert "busy" in refused.value.message
    release.set()
    first.join(timeout=300)
    second.join(timeout=300)
    assert answers == [{"drawn": True}, {"drawn": True}]
    assert queue.run(lambda: "free again") == "free again"
    queue.close()
