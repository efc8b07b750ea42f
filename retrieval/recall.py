"""recall@k for text->image and image->text retrieval, defined exactly as CLIP_benchmark does.

Given L2-normalised text embeddings T (n_texts, D), image embeddings I (n_images, D) and the
image each caption belongs to:

    scores = T @ I.T                                     (cosine, every pair, exact)
    text->image R@k = mean over captions of [its image is among the caption's top-k images]
    image->text R@k = mean over images of [any of its captions is among the image's top-k texts]

Ties are broken by `torch.topk`, as in CLIP_benchmark. A k larger than the gallery is clipped
to the gallery size (everything is retrieved, so recall is 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def hits_at_k(
    scores: torch.Tensor, positives: torch.Tensor, k: int, batch_size: int = 1024
) -> torch.Tensor:
    """(n_queries,) bool: does any positive item appear in each query's top-k?

    scores: (n_queries, n_items) float; positives: (n_queries, n_items) bool.
    """
    k = min(k, scores.shape[1])
    out = []
    for start in range(0, scores.shape[0], batch_size):
        s, p = scores[start : start + batch_size], positives[start : start + batch_size]
        top = torch.topk(s, k, dim=1).indices  # (B, k)
        out.append(torch.gather(p, 1, top).any(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def recall_at_k(
    text_embeddings: np.ndarray | torch.Tensor,
    image_embeddings: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    device: str = "cpu",
) -> dict[str, float]:
    """{"text_to_image_R@k": ..., "image_to_text_R@k": ...} for each k, in [0, 1].

    text_embeddings: (n_texts, D), image_embeddings: (n_images, D), both L2-normalised;
    text_to_image: (n_texts,) index of each caption's image in image_embeddings.
    """
    texts = torch.as_tensor(np.asarray(text_embeddings), dtype=torch.float32, device=device)
    images = torch.as_tensor(np.asarray(image_embeddings), dtype=torch.float32, device=device)
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long, device=device)
    if texts.shape[0] != owner.shape[0]:
        raise ValueError(f"{texts.shape[0]} texts but {owner.shape[0]} caption->image links")
    if len(owner) and (owner.min() < 0 or owner.max() >= images.shape[0]):
        raise ValueError("text_to_image points outside the image list")
    scores = texts @ images.T  # (n_texts, n_images)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(owner), device=device), owner] = True
    metrics: dict[str, float] = {}
    for k in ks:
        t2i = hits_at_k(scores, positives, k)
        i2t = hits_at_k(scores.T, positives.T, k)
        metrics[f"text_to_image_R@{k}"] = t2i.float().mean().item()
        metrics[f"image_to_text_R@{k}"] = i2t.float().mean().item()
    return metrics


def recall_through_search(
    search: Callable[[np.ndarray, int], np.ndarray],
    queries: np.ndarray,
    positives: Sequence[set[int]],
    ks: Sequence[int],
) -> dict[int, float]:
    """R@k when the top-k comes from an index: `search(queries, k) -> (n_queries, k)` item
    positions (-1 for none); positives[q] = the item positions that count as hits for q."""
    top = search(queries, max(ks))
    out = {}
    for k in ks:
        hits = [bool(positives[q] & set(top[q, :k].tolist())) for q in range(len(queries))]
        out[k] = float(np.mean(hits)) if hits else 0.0
    return out
