"""The embedder and the Python API, without the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import vqret
from PIL import Image
from vqret.retrieval.embedder import (
    Embedder,
    ModelConfigError,
    WeightsUnavailableError,
    resolve_weights,
)


def test_embeddings_are_normalised_float32_and_match_across_inputs(embedder, shapes_folder):
    _, drawn = shapes_folder
    paths = [p for p, *_ in drawn[:5]]
    from_paths = embedder.embed_images(paths)
    from_pil = embedder.embed_images([Image.open(p) for p in paths])
    assert from_paths.dtype == np.float32 and from_paths.shape == (5, embedder.embed_dim)
    assert np.allclose(np.linalg.norm(from_paths, axis=1), 1.0, atol=1e-5)
    # decoding in worker processes gives the same vectors as in-process PIL images
    assert np.allclose(from_paths, from_pil, atol=1e-5)
    texts = embedder.embed_texts(["a red circle", "a blue square"])
    assert texts.shape == (2, embedder.embed_dim)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_worker_processes_give_the_same_embeddings(tiny_clip, shapes_folder):
    _, drawn = shapes_folder
    paths = [str(p) for p, *_ in drawn[:40]]
    inline = Embedder(*tiny_clip, device="cpu", batch_size=8, num_workers=0)
    parallel = Embedder(*tiny_clip, device="cpu", batch_size=8, num_workers=2)
    assert np.allclose(inline.embed_images(paths), parallel.embed_images(paths), atol=1e-5)


def test_text_matches_its_drawing(embedder, shapes_folder):
    _, drawn = shapes_folder
    images = embedder.embed_images([p for p, *_ in drawn[:24]])
    captions = [c for _, c, *_ in drawn[:24]]
    texts = embedder.embed_texts(captions)
    # each caption's best image has that caption (classes repeat, so compare captions)
    best = (texts @ images.T).argmax(axis=1)
    hits = np.mean([captions[j] == captions[i] for i, j in enumerate(best)])
    assert hits >= 0.8


def test_config_json_registers_under_its_stem(embedder):
    assert embedder.name == "tiny-clip"
    assert embedder.spec.weights_id.startswith("sha256:")
    assert embedder.spec.model_config["embed_dim"] == embedder.embed_dim


def test_weights_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights("ViT-B-32", "laion2b_s34b_b79k")
    assert "--pretrained /path/to/" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(WeightsUnavailableError, match="unknown pretrained tag"):
        resolve_weights("ViT-B-32", "no-such-tag")
    with pytest.raises(WeightsUnavailableError, match="not found"):
        resolve_weights("ViT-B-32", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelConfigError, match="unknown model"):
        Embedder("ViT-Nope-99", "none")


def test_python_api_index_and_search(shapes_folder, tiny_clip):
    folder, drawn = shapes_folder
    collection = vqret.Collection.create(folder, model=tiny_clip[0], pretrained=tiny_clip[1],
                                         device="cpu", num_workers=0)
    report = collection.index()
    assert report.added == 120 and report.embedded == 120
    hits = collection.search(text="a green square", k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert sum("_green_square" in h.path for h in hits) >= 4
    assert collection.resolve(hits[0]).is_file()
    query = drawn[11][0]
    assert collection.search(image=query, k=1)[0].path == query.name
    by_vector = collection.search(embedding=collection.query_embedding(text="a green square"))
    assert [h.id for h in by_vector[:5]] == [h.id for h in hits]
    with pytest.raises(ValueError, match="empty query"):
        collection.search(text=" ")

    reopened = vqret.Collection.open(folder)  # finds folder/.vqret, loads the model it records
    assert [h.id for h in reopened.search(text="a green square", k=5)] == [h.id for h in hits]


def test_text_prefix_encoding_gives_the_full_embedding(embedder):
    import torch

    texts = ["a red circle", "x", "a purple star " * 3]
    tokens = embedder.tokenizer(texts)
    with torch.inference_mode():
        full = embedder.model.encode_text(tokens)
        prefix = embedder.encode_tokens(tokens)
    # the causal tower pools at the end token: positions after it can't change the result
    assert torch.allclose(full, prefix, atol=1e-5)
    assert embedder.model.positional_embedding.shape[0] == tokens.shape[1]  # restored


def test_bf16_embeddings_stay_within_cosine_0999_and_keep_the_top10(tiny_clip, shapes_folder):
    _, drawn = shapes_folder
    paths = [str(p) for p, *_ in drawn[:48]]
    fp32 = Embedder(*tiny_clip, device="cpu", num_workers=0)
    bf16 = Embedder(*tiny_clip, device="cpu", num_workers=0, precision="bf16")
    a, b = fp32.embed_images(paths), bf16.embed_images(paths)
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    ta, tb = fp32.embed_texts(["a red circle"]), bf16.embed_texts(["a red circle"])
    assert float((ta @ tb.T)[0, 0]) >= 0.999
    top = lambda q, x: set(np.argsort(-(x @ q[0]))[:10].tolist())  # noqa: E731
    assert top(ta, a) == top(tb, b)


def test_fp16_on_a_cpu_is_refused_with_the_alternative(tiny_clip):
    with pytest.raises(ValueError, match="fp16 runs on CUDA only: use bf16"):
        Embedder(*tiny_clip, device="cpu", num_workers=0, precision="fp16")
