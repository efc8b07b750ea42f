"""Exact search of a small table in numpy, so that a cold `vqret search` on a small store
doesn't import faiss (~70 ms, more than the search itself).

Below `SMALL_ROWS` rows the saved index is flat anyway (ann.EXACT_BELOW: exact search takes
about a millisecond), and a matrix-vector product over the rows' embeddings answers what
faiss' IndexIDMap2(IndexFlatIP) would: the same inner products in float32, the same ids, the
best first. Only for a table whose saved plan is flat (or that has none yet); a store whose
user asked for an approximate index keeps it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .store import Store

SMALL_ROWS = 20_000  # 40 MB of ViT-B-32 vectors: read in about the time faiss takes to import


class ExactVectors:
    """The rows' (ids, vectors) with the part of faiss' index interface search uses."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        self.ids = np.asarray(ids, np.int64)
        self.vectors = np.ascontiguousarray(vectors, np.float32)  # (N, D)
        self.ntotal = len(self.ids)
        self.d = self.vectors.shape[1]
        self._position: dict[int, int] | None = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each (Q, k') with k' = min(k, ntotal), best first."""
        return self._top(np.ascontiguousarray(queries, np.float32), k, self.vectors, self.ids)

    def search_among(self, queries: np.ndarray, k: int, allowed: Any
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among the rows whose id `allowed` (a filtered_search.Allowed, or ids) passes:
        exact, whatever the filter's selectivity."""
        if hasattr(allowed, "contains"):
            keep = allowed.contains(self.ids)
        else:
            keep = np.isin(self.ids, np.asarray(allowed, np.int64))
        return self._top(np.ascontiguousarray(queries, np.float32), k, self.vectors[keep],
                         self.ids[keep])

    def reconstruct(self, i: int) -> np.ndarray:
        if self._position is None:
            self._position = {int(v): p for p, v in enumerate(self.ids.tolist())}
        return self.vectors[self._position[int(i)]]

    @staticmethod
    def _top(queries: np.ndarray, k: int, vectors: np.ndarray, ids: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), len(ids))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores = queries @ vectors.T  # (Q, N)
        if k < scores.shape[1]:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), (len(queries), k))
        top = np.take_along_axis(scores, part, axis=1)
        # best first; equal scores by id, as a scan in id order would keep them
        order = np.lexsort((ids[part], -top), axis=1)
        part = np.take_along_axis(part, order, axis=1)
        return np.take_along_axis(scores, part, axis=1), ids[part]


def small_exact_index(store: Store, table: str) -> ExactVectors | None:
    """The table as ExactVectors when it is small and its saved plan is exact, else None
    (the caller loads the faiss index)."""
    if store.count(table) > SMALL_ROWS:
        return None
    from .index import read_meta

    meta = read_meta(store, table)
    if meta is not None and meta.get("plan", {}).get("kind", "flat") != "flat":
        return None
    return ExactVectors(*store.vectors(table))
