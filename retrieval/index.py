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

from .store import IMAGES, Store, write_atomic

log = logging.getLogger(__name__)


def index_files(store: Store, table: str = IMAGES) -> tuple[Path, Path]:
    """(index file, its metadata) of a table: images.faiss + images.json, texts.faiss + ..."""
    return store.path / f"{table}.faiss", store.path / f"{table}.json"


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


def save_index(store: Store, index: faiss.Index, table: str = IMAGES) -> None:
    """Write the index and the generation it covers, each atomically (index first)."""
    final, meta_path = index_files(store, table)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, final)
    meta = {"generation": store.generation, "ntotal": int(index.ntotal), "type": "flat"}
    write_atomic(meta_path, json.dumps(meta).encode())


def load_index(store: Store, table: str = IMAGES) -> faiss.Index:
    """A table's index for the store's current generation: from disk if valid, else rebuilt
    from the rows (in memory; the next `vqret index` writes it)."""
    index = _load_saved(store, table)
    if index is None:
        index = build_index(*store.vectors(table))
    return index


def _load_saved(store: Store, table: str) -> faiss.Index | None:
    index_path, meta_path = index_files(store, table)
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
    if index.ntotal != store.count(table) or index.d != store.dim:
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
