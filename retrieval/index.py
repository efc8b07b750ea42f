"""The FAISS index over a store's rows: vectors are addressed by row id, never by position.

Exact inner-product search over L2-normalised vectors (= cosine). The index is a cache of the
Parquet rows: `index.json` records the store generation it was built from, and a missing,
stale or damaged index file is rebuilt from the rows.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import faiss
import numpy as np

from .store import Store, write_atomic

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def build_index(ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """IndexIDMap2(Flat inner product) holding `vectors` (N, D) under int64 `ids` (N,)."""
    dim = vectors.shape[1]
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))
    return index


def to_search_device(index: faiss.Index) -> faiss.Index:
    """The same index on the GPU when faiss sees one (faiss-gpu build), else unchanged."""
    if gpu_count() == 0 or index.ntotal == 0:
        return index
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index)
    except Exception as e:  # noqa: BLE001 - a GPU that can't take it falls back to the CPU
        log.warning("faiss GPU unavailable (%s); searching on the CPU", e)
        return index


def save_index(store: Store, index: faiss.Index) -> None:
    """Write the index and the generation it covers, each atomically (index first)."""
    final = store.path / INDEX_FILE
    tmp = final.with_name(f".tmp-{INDEX_FILE}-{uuid.uuid4().hex[:8]}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, final)
    meta = {"generation": store.generation, "ntotal": int(index.ntotal), "type": "flat"}
    write_atomic(store.path / INDEX_META, json.dumps(meta).encode())


def load_index(store: Store, rebuild_if_stale: bool = True) -> faiss.Index:
    """The store's index for its current generation: from disk if valid, else from the rows."""
    index = _load_saved(store)
    if index is None:
        if not rebuild_if_stale:
            raise FileNotFoundError(store.path / INDEX_FILE)
        ids, vectors = store.vectors()
        index = build_index(ids, vectors)
    return index


def _load_saved(store: Store) -> faiss.Index | None:
    meta_path, index_path = store.path / INDEX_META, store.path / INDEX_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("generation") != store.generation or not index_path.is_file():
        return None
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        log.warning("%s is damaged (%s); rebuilding it from the rows", index_path, e)
        return None
    if index.ntotal != len(store) or index.d != store.dim:
        return None
    return index


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids), each (Q, k'), with k' = min(k, ntotal); -1 ids never returned."""
    k = min(int(k), int(index.ntotal))
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores, ids = index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, ids


def index_path(store: Store) -> Path:
    return store.path / INDEX_FILE
