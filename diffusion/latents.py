"""Training pairs from a store: each image's CLIP embedding and its tokenizer latents.

The latents of every image (and of its mirror image, for flip augmentation: a conv encoder
is not exactly flip-equivariant, so the mirror is encoded rather than the latent flipped) are
cached in STORE/latents/<tokenizer id>.npz. A run computes only the rows the cache lacks and
drops rows the store no longer has; the file is replaced atomically, so a killed run keeps
the previous cache. Images that can't be loaded cost one line and are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vqret.retrieval.atomic import atomic_write
from vqret.retrieval.images import ImageLoadError
from vqret.retrieval.store import Store, embeddings_from_arrow
from vqret.tokenizer.api import Tokenizer
from vqret.tokenizer.data import center_square

__all__ = ["LATENTS_DIRNAME", "TrainingPairs", "latents_cache_path", "load_training_pairs"]

LATENTS_DIRNAME = "latents"
ENCODE_BATCH = 256

Log = Callable[[str], None]


@dataclass
class TrainingPairs:
    ids: np.ndarray  # int64 (N,) store row ids
    embeddings: np.ndarray  # float32 (N, E), L2-normalised CLIP image embeddings
    latents: np.ndarray  # float32 (N, C, G, G) tokenizer latents (unscaled)
    flipped: np.ndarray  # float32 (N, C, G, G) latents of the mirrored images

    def __len__(self) -> int:
        return len(self.ids)


def latents_cache_path(store: Store, tokenizer_id: str) -> Path:
    return store.path / LATENTS_DIRNAME / f"{tokenizer_id}.npz"


def load_training_pairs(
    store: Store, tokenizer: Tokenizer, *, log: Log | None = None
) -> TrainingPairs:
    """Embeddings and latents of every image row of `store`, computing missing latents."""
    say = log or (lambda line: None)
    if tokenizer.id is None:
        raise ValueError("the tokenizer must be loaded from a checkpoint (its id keys the cache)")
    rows = store.read_table(["id", "path", "embedding"])
    ids = rows.column("id").to_numpy().astype(np.int64)
    embeddings = embeddings_from_arrow(rows.column("embedding"), store.dim)
    paths = rows.column("path").to_pylist()
    if len(ids) == 0:
        raise ValueError(f"{store.path} has no images: index some with `vqret index` first")

    cache_file = latents_cache_path(store, tokenizer.id)
    cached_ids, cached, cached_flipped = _read_cache(cache_file, say)
    position = {int(i): k for k, i in enumerate(cached_ids)}
    missing = [k for k, i in enumerate(ids) if int(i) not in position]
    new_ids, new_lat, new_flip = [], [], []
    if missing:
        say(f"computing latents of {len(missing)} images with tokenizer {tokenizer.id[:12]}")
    for start in range(0, len(missing), ENCODE_BATCH):
        batch = missing[start : start + ENCODE_BATCH]
        views, kept = [], []
        for k in batch:
            try:
                views.append(center_square(store.root / paths[k], tokenizer.image_size))
                kept.append(k)
            except ImageLoadError as e:
                say(f"skipped {paths[k]}: {e}")
        if not views:
            continue
        pixels = np.stack(views)  # (B, S, S, 3)
        new_ids.append(ids[kept])
        new_lat.append(tokenizer.latents(list(pixels)))
        new_flip.append(tokenizer.latents(list(pixels[:, :, ::-1].copy())))
    if new_ids or len(cached_ids) != len(set(position) & set(ids.tolist())):
        all_ids = np.concatenate([cached_ids, *new_ids])
        all_lat = _concat([cached, *new_lat])
        all_flip = _concat([cached_flipped, *new_flip])
        keep = np.isin(all_ids, ids)  # rows deleted from the store leave the cache
        _write_cache(cache_file, all_ids[keep], all_lat[keep], all_flip[keep])
        cached_ids, cached, cached_flipped = all_ids[keep], all_lat[keep], all_flip[keep]

    # align with the store's rows; rows whose image failed to load are left out
    position = {int(i): k for k, i in enumerate(cached_ids)}
    have = np.array([int(i) in position for i in ids], dtype=bool)
    order = np.array([position[int(i)] for i in ids[have]], dtype=np.int64)
    return TrainingPairs(
        ids=ids[have],
        embeddings=embeddings[have],
        latents=cached[order].astype(np.float32),
        flipped=cached_flipped[order].astype(np.float32),
    )


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    # an empty cache has no latent shape yet: leave it out rather than fail on the shapes
    kept = [a for a in arrays if len(a)]
    return np.concatenate(kept) if kept else arrays[0]


def _read_cache(path: Path, say: Log) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    empty = np.zeros(0, np.int64), np.zeros((0, 0, 0, 0), np.float16)
    if not path.is_file():
        return empty[0], empty[1], empty[1]
    try:
        with np.load(path) as data:
            return data["ids"], data["latents"], data["flipped"]
    except (OSError, ValueError, KeyError) as e:
        say(f"{path}: unreadable latents cache ({e}); computing it again")
        return empty[0], empty[1], empty[1]


def _write_cache(path: Path, ids: np.ndarray, latents: np.ndarray, flipped: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            # float16 halves the cache; latents are O(1) values, well inside its precision
            np.savez(f, ids=ids, latents=latents.astype(np.float16),
                     flipped=flipped.astype(np.float16))

    atomic_write(path, write)
