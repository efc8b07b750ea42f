"""`vqret bench recall`: zero-shot retrieval recall@k on a caption set, as CLIP_benchmark.

Reproduce the published numbers (open_clip's table, made with CLIP_benchmark) with real weights:

    vqret bench recall --captions flickr30k/dataset_flickr30k.json --split test \
        --images flickr30k/images --model ViT-B-32 --pretrained laion2b_s34b_b79k
    vqret bench recall --captions coco/dataset_coco.json --split test --images coco \
        --model ViT-B-32 --pretrained laion2b_s34b_b79k
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from vqret.retrieval.captions import read_captions
from vqret.retrieval.embedder import Embedder
from vqret.retrieval.recall import recall_at_k, recall_through_search


def embed_caption_set(
    embedder: Embedder, captions_file: Path, images: Path, split: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[int], Any]:
    """(image embeddings, text embeddings, caption->image positions, the CaptionSet)."""
    data = read_captions(captions_file, split)
    paths = [str(Path(images) / name) for name in data.images]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(paths)} images of {captions_file} are not under {images}, "
            f"e.g. {missing[0]}"
        )
    image_emb = np.zeros((len(paths), embedder.embed_dim), np.float32)
    for batch in embedder.iter_image_files(paths):
        if batch.failures:
            i, cause = batch.failures[0]
            raise ValueError(f"{paths[i]}: {cause}")
        image_emb[batch.indices] = batch.embeddings
    text_emb = embedder.embed_texts(data.captions)
    return image_emb, text_emb, data.caption_image, data


def ann_recall(
    index_factory: Callable[[np.ndarray], Any],
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: Sequence[int],
    ks: Sequence[int],
) -> dict[str, float]:
    """The same recall@k when both directions go through an ANN index built by
    `index_factory(vectors) -> faiss index over positions`."""
    owner = np.asarray(caption_image)
    captions_of: list[set[int]] = [set() for _ in range(len(image_emb))]
    for t, i in enumerate(owner):
        captions_of[i].add(t)
    image_index, text_index = index_factory(image_emb), index_factory(text_emb)

    def search(index):
        return lambda q, k: index.search(np.ascontiguousarray(q), min(k, index.ntotal))[1]

    t2i = recall_through_search(search(image_index), text_emb, [{int(i)} for i in owner], ks)
    i2t = recall_through_search(search(text_index), image_emb, captions_of, ks)
    out = {f"text_to_image_R@{k}": v for k, v in t2i.items()}
    out.update({f"image_to_text_R@{k}": v for k, v in i2t.items()})
    return out


def run_recall_benchmark(
    captions: Path,
    images: Path,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "laion2b_s34b_b79k",
    ks: Sequence[int] = (1, 5, 10),
    split: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 64,
    index: str | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Exact recall@k (and through an ANN index when `index` names one) as a JSON-able dict."""
    started = time.perf_counter()
    embedder = Embedder(model, pretrained, device=device, batch_size=batch_size,
                        precision=precision)
    if log:
        log(f"embedding {captions} with {embedder.name} ({embedder.spec.weights_id})")
    image_emb, text_emb, caption_image, data = embed_caption_set(
        embedder, captions, images, split
    )
    exact = recall_at_k(text_emb, image_emb, caption_image, ks)
    result: dict[str, Any] = {
        "model": embedder.name,
        "pretrained": embedder.spec.weights_id,
        "precision": precision,
        "device": str(embedder.device),
        "images": len(data.images),
        "captions": len(data.captions),
        "split": split,
        "exact": {k: round(v * 100, 2) for k, v in exact.items()},
    }
    if index and index != "flat":
        from vqret.retrieval.ann import build_ann_for_vectors

        built = ann_recall(
            lambda v: build_ann_for_vectors(v, kind=index), image_emb, text_emb,
            caption_image, ks,
        )
        result["index"] = index
        result["ann"] = {k: round(v * 100, 2) for k, v in built.items()}
    else:
        result["index"] = "flat"
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
