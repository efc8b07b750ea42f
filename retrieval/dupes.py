"""Near-duplicate images: candidates from their code grids, confirmed by their embeddings.

1. Candidates (no O(N^2)): locality-sensitive hashing over the code grids. Each of `bands`
   bands looks at `band_size` grid positions drawn at random (seeded); images whose codes
   agree on all positions of some band fall in the same bucket and become candidate pairs.
   Two grids that agree on a fraction p of their positions share a band with probability
   1 - (1 - p^band_size)^bands: with the defaults (32 bands of 2 positions) 0.94 at p = 0.3
   and > 0.9999 at p = 0.5. A bucket of more than `max_bucket` images (codes that many
   images share, e.g. flat backgrounds) is split by `band_size` more positions, up to
   `depth` times; one that is still too large (a big cluster of copies agreeing on 10
   positions) pairs each member with its next `window` members instead of with all.
   So the candidates stay O(N * bands * max_bucket) whatever the data.
2. Confirmation: a pair is a duplicate when at least `codes_threshold` of its grid positions
   hold the same code and the cosine similarity of its embeddings is at least `threshold`.
3. Groups: connected components of the confirmed pairs (union-find).

Calibration, `cpu` tokenizer on 60 caltech101 images: a JPEG re-encode at quality 40 keeps
64-95% of the codes (median 81%), a 90% resize 29-100% (median 93%); unrelated pairs agree
on a median of 0% and at most 73% (plain backgrounds), which is why codes alone don't decide.

Why here, beside the store, and not in vqret.tokenizer: the finder runs no model. It reads
store rows only (their `codes`, `codes_tokenizer` and `embedding` columns, and the manifest's
"tokenizer" record that `vqret tokenizer encode` leaves) with numpy and pyarrow, so what it
depends on is the store's layout, not the tokenizer: the tokenizer writes the codes, this
compares them. Here `Collection.dupes()` reaches it without retrieval importing the
tokenizer package, which the layers forbid. (vqret.tokenizer.dupes re-exports it for code
that imports it from there.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from .store import Store, StoreError, embeddings_from_arrow

__all__ = ["DupeGroup", "DupeReport", "find_duplicates", "candidate_pairs"]

THRESHOLD = 0.95  # embedding cosine similarity
CODES_THRESHOLD = 0.25  # fraction of grid positions with the same code
BANDS = 32
BAND_SIZE = 2
MAX_BUCKET = 16  # larger buckets are split by more positions, DEPTH times at most
DEPTH = 4
WINDOW = 4  # a bucket still too large: each member is paired with its next WINDOW members


@dataclass
class DupeGroup:
    ids: list[int]
    paths: list[str]
    similarity: list[float]  # each member's cosine to the first (1.0 for the first)
    codes_match: list[float]  # each member's fraction of codes equal to the first's

    def to_dict(self) -> dict[str, Any]:
        return {
            "ids": self.ids,
            "paths": self.paths,
            "similarity": [round(s, 4) for s in self.similarity],
            "codes_match": [round(c, 4) for c in self.codes_match],
        }


@dataclass
class DupeReport:
    groups: list[DupeGroup]
    tokenizer: str | None  # the tokenizer whose codes were compared
    images: int  # rows compared (with codes from that tokenizer)
    without_codes: int  # rows left out: no codes yet, or from another tokenizer
    candidates: int  # pairs that shared a band
    threshold: float
    codes_threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer,
            "images": self.images,
            "without_codes": self.without_codes,
            "candidates": self.candidates,
            "threshold": self.threshold,
            "codes_threshold": self.codes_threshold,
            "groups": [g.to_dict() for g in self.groups],
        }


def candidate_pairs(
    codes: np.ndarray,
    *,
    bands: int = BANDS,
    band_size: int = BAND_SIZE,
    max_bucket: int = MAX_BUCKET,
    depth: int = DEPTH,
    window: int = WINDOW,
    seed: int = 0,
) -> np.ndarray:
    """Pairs (i < j) of rows of `codes` (N, L) that agree on every position of some band:
    int64 (P, 2), unique, sorted."""
    n, length = codes.shape
    if n < 2 or length == 0:
        return np.zeros((0, 2), np.int64)
    rng = np.random.default_rng(seed)
    size = min(band_size, length)
    found = [
        _band_pairs(codes, lambda: rng.choice(length, size=size, replace=False), max_bucket,
                    depth, window)
        for _ in range(bands)
    ]
    pairs = np.concatenate(found)
    if not len(pairs):
        return pairs
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1)


def _band_pairs(codes, draw_positions, max_bucket: int, depth: int, window: int) -> np.ndarray:
    """One band: buckets of rows with equal codes at the drawn positions. A bucket larger
    than max_bucket is split by more positions (up to `depth` times: codes many images
    share, like flat backgrounds, stop matching); one still too large (a big cluster of
    near-copies) pairs each member with its next `window` members only."""
    rows = np.arange(len(codes))
    keys = _row_keys(codes[:, draw_positions()])
    out = []
    for level in range(depth + 1):
        sizes = np.bincount(keys)
        out.append(rows[_pairs_in_buckets(keys, sizes, max_bucket)])
        big = sizes[keys] > max_bucket
        if not big.any():
            break
        rows, keys = rows[big], keys[big]
        if level == depth:
            out.append(rows[_window_pairs(keys, window)])
            break
        more = _row_keys(codes[np.ix_(rows, draw_positions())])
        keys = np.unique(keys * (int(more.max()) + 1) + more, return_inverse=True)[1]
    return np.concatenate(out)


def _row_keys(sub: np.ndarray) -> np.ndarray:
    """Dense int64 ids of the rows of `sub` (N, k): equal rows get equal ids."""
    if sub.shape[1] <= 3:  # pack up to three uint16 codes into one int64: a 1-D unique
        packed = np.zeros(len(sub), np.int64)
        for k in range(sub.shape[1]):
            packed |= sub[:, k].astype(np.int64) << (16 * k)
        return np.unique(packed, return_inverse=True)[1].reshape(-1)
    return np.unique(sub, axis=0, return_inverse=True)[1].reshape(-1)


def _pairs_in_buckets(bucket: np.ndarray, sizes: np.ndarray, max_bucket: int) -> np.ndarray:
    """All (i < j) with bucket[i] == bucket[j], in buckets of 2..max_bucket members,
    vectorised per bucket size (no Python loop over buckets)."""
    order = np.argsort(bucket, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = []
    for m in np.unique(sizes):
        if m < 2 or m > max_bucket:
            continue
        first = starts[sizes == m]  # (B,) where each bucket of size m begins in `order`
        a, b = np.triu_indices(m, k=1)
        left = order[first[:, None] + a[None, :]].reshape(-1)
        right = order[first[:, None] + b[None, :]].reshape(-1)
        out.append(np.stack([np.minimum(left, right), np.maximum(left, right)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _window_pairs(bucket: np.ndarray, window: int) -> np.ndarray:
    """(i < j) for each member and its next `window` members of the same bucket."""
    order = np.argsort(bucket, kind="stable")
    out = []
    for offset in range(1, window + 1):
        i, j = order[:-offset], order[offset:]
        same = bucket[i] == bucket[j]
        out.append(np.stack([np.minimum(i, j)[same], np.maximum(i, j)[same]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _components(n: int, pairs: np.ndarray) -> list[list[int]]:
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in np.unique(pairs.reshape(-1)):
        groups.setdefault(root(int(i)), []).append(int(i))
    return [sorted(members) for members in groups.values()]


def find_duplicates(
    store: Store,
    *,
    threshold: float = THRESHOLD,
    codes_threshold: float = CODES_THRESHOLD,
    tokenizer_id: str | None = None,
    bands: int = BANDS,
    band_size: int = BAND_SIZE,
    max_bucket: int = MAX_BUCKET,
) -> DupeReport:
    """Groups of near-duplicate images among the rows that have codes.

    `tokenizer_id`: whose codes to compare (default: the tokenizer the store's codes were
    last made with, else the most common one among the rows).
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if not 0.0 <= codes_threshold <= 1.0:
        raise ValueError(f"codes threshold is a fraction in [0, 1], got {codes_threshold}")
    if bands < 1 or band_size < 1 or max_bucket < 2:
        raise ValueError("bands and band size must be >= 1, max bucket >= 2")
    rows = store.read_table(["id", "path", "codes", "codes_tokenizer", "embedding"])
    if tokenizer_id is None:
        tokenizer_id = (store.manifest.get("tokenizer") or {}).get("id")
        tags = Counter(t for t in rows.column("codes_tokenizer").to_pylist() if t)
        if tokenizer_id not in tags:
            tokenizer_id = tags.most_common(1)[0][0] if tags else None
    if tokenizer_id is None:
        raise StoreError(
            f"{store.path}: no image has codes yet: run `vqret tokenizer encode` first"
        )
    mine = pc.fill_null(pc.equal(rows.column("codes_tokenizer"), tokenizer_id), False)
    kept = rows.filter(mine)
    n = kept.num_rows
    lengths = pc.list_value_length(kept.column("codes")).to_numpy(zero_copy_only=False)
    if n and (lengths != lengths[0]).any():
        raise StoreError(f"{store.path}: codes of tokenizer {tokenizer_id[:12]} differ in size")
    length = int(lengths[0]) if n else 0
    codes = (
        pc.list_flatten(kept.column("codes")).to_numpy().astype(np.uint16).reshape(n, length)
        if n
        else np.zeros((0, 0), np.uint16)
    )
    embeddings = embeddings_from_arrow(kept.column("embedding"), store.dim)
    pairs = candidate_pairs(codes, bands=bands, band_size=band_size, max_bucket=max_bucket)
    candidates = len(pairs)
    if candidates:
        agree, cosine = _pair_scores(codes, embeddings, pairs)
        pairs = pairs[(agree >= codes_threshold) & (cosine >= threshold)]
    ids = kept.column("id").to_pylist()
    paths = kept.column("path").to_pylist()
    groups = []
    for members in _components(n, pairs):
        first = members[0]
        groups.append(
            DupeGroup(
                ids=[ids[i] for i in members],
                paths=[paths[i] for i in members],
                similarity=[float(embeddings[first] @ embeddings[i]) for i in members],
                codes_match=[float((codes[first] == codes[i]).mean()) for i in members],
            )
        )
    groups.sort(key=lambda g: (-len(g.ids), g.paths[0]))
    return DupeReport(
        groups=groups,
        tokenizer=tokenizer_id,
        images=n,
        without_codes=rows.num_rows - n,
        candidates=candidates,
        threshold=threshold,
        codes_threshold=codes_threshold,
    )


def _pair_scores(
    codes: np.ndarray, embeddings: np.ndarray, pairs: np.ndarray, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of equal codes, embedding cosine) of each pair, in chunks to bound memory."""
    agree, cosine = [], []
    for start in range(0, len(pairs), chunk):
        i, j = pairs[start : start + chunk, 0], pairs[start : start + chunk, 1]
        agree.append((codes[i] == codes[j]).mean(axis=1))
        cosine.append(np.einsum("nd,nd->n", embeddings[i], embeddings[j]))
    return np.concatenate(agree), np.concatenate(cosine)
