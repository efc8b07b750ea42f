"""Text search without torch: the exported ONNX text encoder and the torch-free tokenizer.

What must hold: the same token ids as open_clip, the same embeddings as the torch Embedder,
the same search results, no torch import in a cold `vqret search`, and a stale, damaged or
unusable export never answering (the torch path answers instead).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_json
from fixtures.shapes import caption, make_shape_folder
from vqret import Collection
from vqret.retrieval.onnx_export import export_text_encoder
from vqret.retrieval.onnx_text import (
    BUNDLE_DIRNAME,
    DATA_FILE,
    META_FILE,
    TOKENIZER_FILE,
    TextEncoderUnavailable,
    load_text_encoder,
    read_meta,
)
from vqret.retrieval.text_tokenizer import ClipTokenizer, ftfy_is_identity

TORCH_MODULES = ("torch", "torchvision", "open_clip")

# Strings where a tokenizer can go wrong: unicode, accents, CJK, emoji, HTML entities,
# contractions, control characters, mojibake ftfy mends, special tokens typed literally,
# texts longer than any context, whitespace of every kind, and nothing at all.
TRICKY = [
    "a red car", "", "   ", "A Photo of a DOG!!!", "naïve café résumé", "日本語のテキスト",
    "emoji 🚗🔥 test", "it's can't we'll they're I'd", "&amp;lt;b&amp;gt; &quot;q&quot; &#39;",
    "<start_of_text> hi <end_of_text>", "x" * 300, "word " * 100,
    "tab\tnew\nline\r\nnbsp\u00a0em\u2003space", "Ǆ ß İstanbul ﬁ ligature", "mojibake: Ã©tÃ©",
    "numbers 1234567 3.14 ½ ² Ⅳ", "\u200bzero\u200dwidth", "Ελληνικά κείμενο", "مرحبا بالعالم",
    "ＦＵＬＬＷＩＤＴＨ", "ctrl\x01\x07\x1b[31mred\x7f", "under_score snake_case", "a" * 77,
    "“curly” ‘quotes’ — dash … ellipsis", "ᏣᎳᎩ ᠮᠣᠩᠭᠣᠯ ꦗꦮ 𓀀", "A\u0301 e\u0301 (combining)",
    "</w> w> a</w>b", "aaaa bbbb abababab", "supercalifragilisticexpialidocious",
]


def _open_clip_tokenizer(context_length: int):
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------


def test_tokenizer_ids_equal_open_clips() -> None:
    rng = random.Random(7)
    alphabet = string.printable + "éßü日本🚗&;#<>'’\u00a0\u200b"
    texts = TRICKY + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
                      for _ in range(150)]
    # 16: the fixture's context, where most texts are cut. one_shot: the BPE built per text
    # over the merge rules that can fire in it, as a cold search does.
    for context, one_shot in ((77, False), (77, True), (16, True)):
        ours = ClipTokenizer.from_open_clip_vocab(context, one_shot=one_shot)
        reference = _open_clip_tokenizer(context)(texts).numpy()
        got = ours(texts)
        assert got.shape == reference.shape
        rows = [texts[i] for i in np.flatnonzero((got != reference).any(axis=1))]
        assert not rows, f"different ids at context {context} ({one_shot=}) for {rows[:5]}"
    # a cut text still ends with the end token, as open_clip's does
    assert got[TRICKY.index("word " * 100), -1] == ours.eot_id


def test_ftfy_is_skipped_only_where_it_changes_nothing() -> None:
    import ftfy

    rng = random.Random(3)
    plain = string.ascii_letters + string.digits + string.punctuation.replace("&", "") + " \t\n"
    samples = ["".join(rng.choice(plain) for _ in range(rng.randint(0, 80))) for _ in range(2000)]
    for text in samples:
        assert ftfy_is_identity(text)
        assert " ".join(ftfy.fix_text(text).split()) == " ".join(text.split()), repr(text)
    for text in ("café", "a &amp; b", "\x01x", "Ã©", "ﬁ", "\u00a0"):
        assert not ftfy_is_identity(text)


# --------------------------------------------------------------------------------------------
# one store, indexed once through the CLI (which exports the text encoder)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip) -> Path:
    folder = tmp_path_factory.mktemp("cold") / "images"
    make_shape_folder(folder, 48, seed=77)
    run_cli("index", str(folder), "--model", tiny_clip[0], "--pretrained", tiny_clip[1],
            "--precision", "bf16", "-q")  # the export is fp32 all the same
    return folder / ".vqret"


def _copy(store: Path, tmp_path: Path) -> Path:
    """A copy of the store to damage (it still indexes the same folder)."""
    copy = tmp_path / "copy.vqret"
    shutil.copytree(store, copy)
    return copy


def _torch_results(store: Path, queries: list[str], k: int = 5) -> list[list[tuple[int, float]]]:
    col = Collection.open(store, text_encoder="torch", device="cpu")
    return [[(h.id, h.score) for h in col.search(text=q, k=k)] for q in queries]


def _assert_same_hits(got, expected) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=2e-5)


def _imported(proc) -> set[str]:
    """Top-level modules a `python -X importtime` run imported (from its stderr)."""
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_index_exports_a_text_encoder_tied_to_the_model(store: Path) -> None:
    meta = json.loads((store / BUNDLE_DIRNAME / META_FILE).read_text())
    spec = Collection.open(store).store.spec
    assert meta["key"]["weights_id"] == spec.weights_id and meta["prefix"] is True
    assert read_meta(store, spec) == meta
    for name, size in meta["files"].items():
        assert (store / BUNDLE_DIRNAME / name).stat().st_size == size
    assert not list(store.glob(".tmp-*")), "no temporary folder left behind"


def test_onnx_embeddings_equal_the_torch_embedders(store: Path, embedder) -> None:
    encoder = load_text_encoder(store, Collection.open(store).store.spec)
    texts = [caption("red", "circle"), "", "a blue star", "a very long caption " * 10,
             "A Photo of a DOG!!! naïve café 🚗", caption("green", "triangle")]
    got = encoder.embed_texts(texts)  # one batch, rows of different lengths
    expected = embedder.embed_texts(texts)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert ((got * expected).sum(axis=1) >= 0.9999).all()
    one = encoder.embed_texts([texts[0]])  # alone (after the first call's self-check)
    assert float(one[0] @ expected[0]) >= 0.9999


def test_search_results_equal_the_torch_paths(store: Path) -> None:
    queries = [caption(c, s) for c, s in [("red", "circle"), ("blue", "star"),
                                          ("green", "square"), ("yellow", "triangle")]]
    queries.append("something else entirely")
    onnx = Collection.open(store, device="cpu")
    got = [[(h.id, h.score) for h in onnx.search(text=q, k=8)] for q in queries]
    assert onnx.text_path_reason == "", "the ONNX encoder answered"
    for hits, expected in zip(got, _torch_results(store, queries, k=8), strict=True):
        _assert_same_hits(hits, expected)


def test_cold_cli_search_imports_no_torch(store: Path) -> None:
    query = caption("red", "circle")
    proc = run_cli("search", query, "--store", str(store), "--json",
                   env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = _imported(proc)
    assert "onnxruntime" in imported
    assert not imported & set(TORCH_MODULES), sorted(imported & set(TORCH_MODULES))
    assert "faiss" not in imported, "a small store is searched in numpy (exact_small.py)"
    hits = [(r["id"], r["score"]) for r in json.loads(proc.stdout)]
    _assert_same_hits(hits, _torch_results(store, [query], k=10)[0])


def test_stale_export_is_bypassed_then_rebuilt(store: Path, tmp_path: Path) -> None:
    copy = _copy(store, tmp_path)
    killed = copy / f".tmp-{BUNDLE_DIRNAME}-deadbeef"  # an export killed an hour ago
    killed.mkdir()
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    meta_path = copy / BUNDLE_DIRNAME / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["key"]["weights_id"] = "sha256:another-model"
    meta_path.write_text(json.dumps(meta))
    query = caption("blue", "square")
    proc = run_cli("search", query, "--store", str(copy), "--json",
                   env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert "torch" in _imported(proc), "a stale export is never used"
    hits = [(r["id"], r["score"]) for r in json.loads(proc.stdout)]
    _assert_same_hits(hits, _torch_results(store, [query], k=10)[0])
    # that search exported a fresh one, so the next search is torch-free again
    rebuilt = json.loads(meta_path.read_text())
    assert not killed.exists(), "a killed export's folder is cleaned up"
    assert rebuilt["key"] == json.loads((store / BUNDLE_DIRNAME / META_FILE).read_text())["key"]
    again = Collection.open(copy, device="cpu")
    _assert_same_hits([(h.id, h.score) for h in again.search(text=query, k=10)], hits)
    assert again.text_path_reason == ""


@pytest.mark.parametrize("damage", ["truncated weights", "same-size garbage", "bad tokenizer"])
def test_damaged_export_never_answers(store: Path, tmp_path: Path, damage: str) -> None:
    copy = _copy(store, tmp_path)
    folder = copy / BUNDLE_DIRNAME
    if damage == "truncated weights":
        data = (folder / DATA_FILE).read_bytes()
        (folder / DATA_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "same-size garbage":  # loads fine; only the probe can tell
        data = bytearray((folder / DATA_FILE).read_bytes())
        data[: len(data) // 2] = np.random.default_rng(0).bytes(len(data) // 2)
        (folder / DATA_FILE).write_bytes(bytes(data))
    else:
        (folder / TOKENIZER_FILE).write_text("{not json")
        meta = json.loads((folder / META_FILE).read_text())
        meta["files"][TOKENIZER_FILE] = (folder / TOKENIZER_FILE).stat().st_size
        (folder / META_FILE).write_text(json.dumps(meta))
    queries = [caption("red", "star"), caption("yellow", "circle")]
    col = Collection.open(copy, device="cpu")
    got = [[(h.id, h.score) for h in col.search(text=q, k=6)] for q in queries]
    assert col.text_path_reason, "the damaged encoder was refused"
    assert col.text_export_would_help
    for hits, expected in zip(got, _torch_results(store, queries, k=6), strict=True):
        _assert_same_hits(hits, expected)
    # (that a new export mends it is test_stale_export_is_bypassed_then_rebuilt's job)


def test_without_onnxruntime_search_still_answers(store: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "block" / "onnxruntime"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('onnxruntime blocked by a test')\n")
    query = caption("green", "star")
    before = (store / BUNDLE_DIRNAME / META_FILE).read_bytes()
    path = os.pathsep.join(p for p in (str(blocker.parent), os.environ.get("PYTHONPATH")) if p)
    hits = run_json("search", query, "--store", str(store), env={"PYTHONPATH": path})
    _assert_same_hits([(r["id"], r["score"]) for r in hits],
                      _torch_results(store, [query], k=10)[0])
    assert (store / BUNDLE_DIRNAME / META_FILE).read_bytes() == before, "nothing re-exported"


def test_a_model_that_cannot_export_is_recorded_once(tmp_path: Path, embedder) -> None:
    class OtherTokenizer:  # as a model with an HF tokenizer would have
        context_length = 77

    store = tmp_path / "s.vqret"
    store.mkdir()
    original = embedder.tokenizer
    embedder.tokenizer = OtherTokenizer()
    try:
        with pytest.raises(TextEncoderUnavailable, match="not CLIP's BPE"):
            export_text_encoder(store, embedder)
    finally:
        embedder.tokenizer = original
    with pytest.raises(TextEncoderUnavailable, match="failed earlier") as info:
        read_meta(store, embedder.spec)
    assert info.value.rebuild is False, "searches don't retry an export that can't work"


def test_cold_search_benchmark_compares_both_paths(store: Path) -> None:
    from vqret.benchmarks.cold_query import measure_cold_search

    result = measure_cold_search(store, repeats=1, warmup=False)
    assert result["cold_search_same_top_k"] is True
    assert result["cold_search_max_score_diff"] < 1e-4
    onnx_s, torch_s = result["cold_search_onnx_s"], result["cold_search_torch_s"]
    assert onnx_s > 0 and torch_s > 0
    # one run each: its median is its minimum
    assert (result["cold_search_onnx_s_min"], result["cold_search_torch_s_min"]) == (
        onnx_s, torch_s)
    # the speedup is torch / onnx from the unrounded medians, shown to 2 decimals; the
    # medians are shown to 3. Bounded by the rounding itself, not a share of the figure
    # (which a slow run makes small and its rounding error large).
    half = 0.0005
    low, high = (torch_s - half) / (onnx_s + half), (torch_s + half) / (onnx_s - half)
    assert low - 0.005 <= result["cold_search_speedup"] <= high + 0.005


def test_the_torch_path_can_be_asked_for(store: Path, monkeypatch) -> None:
    monkeypatch.setenv("VQRET_TEXT_ENCODER", "torch")
    col = Collection.open(store, device="cpu")
    hits = col.search(text=caption("purple", "square"), k=3)
    assert col.text_path_reason == "the model is loaded or asked for"
    assert col._embedder is not None and len(hits) == 3
    with pytest.raises(ValueError, match="unknown text encoder"):
        Collection.open(store, text_encoder="tensorflow")


def test_export_names_still_resolve_from_the_inference_module() -> None:
    from vqret.retrieval import onnx_export, onnx_text

    assert onnx_text.export_text_encoder is onnx_export.export_text_encoder
    assert onnx_text.ensure_text_encoder is onnx_export.ensure_text_encoder
