"""The FAISS index of a store table: vectors addressed by row id, never by position.

Inner product over L2-normalised vectors (= cosine). The index is a cache of the Parquet rows:
`<table>.json` records the store generation it covers and the plan it was built with (type,
parameters, measured recall and latency). After an indexing run the index is updated in place
(remove + add of the ids the run changed) when the saved one covers the generation the run
started from, and rebuilt otherwise; readers rebuild an exact index from the rows when the
saved one is missing or damaged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import ann
from .device import cuda_number
from .exact_small import ExactVectors
from .lazy_import import lazy_import
from .part_health import file_check, file_damage
from .store import IMAGES, Store, write_atomic

faiss = lazy_import("faiss")  # not for a run that changed nothing (docs/startup.md)
log = logging.getLogger(__name__)

# Memory-map index files larger than this share of RAM instead of reading them in.
MMAP_SHARE = 0.25


def index_files(store: Store, table: str = IMAGES) -> tuple[Path, Path]:
    """(index file, its metadata) of a table: images.faiss + images.json, texts.faiss + ..."""
    return store.path / f"{table}.faiss", store.path / f"{table}.json"


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def build_index(ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """Exact index: IndexIDMap2(Flat inner product), `vectors` (N, D) under int64 `ids` (N,)."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))
    return index


def to_search_device(index: faiss.Index, device: str = "auto") -> faiss.Index:
    """The same index on the GPU `device` names (auto: the first) when faiss sees it (a
    faiss-gpu build), else unchanged: cpu and mps keep it on the CPU."""
    number = cuda_number(device)
    if number is None or number >= gpu_count() or index.ntotal == 0:
        return index
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, number, index)
    except Exception as e:  # noqa: BLE001 - an index type the GPU can't take stays on the CPU
        log.warning("faiss GPU unavailable for this index (%s); searching on the CPU", e)
        return index


def read_meta(store: Store, table: str = IMAGES) -> dict | None:
    try:
        return json.loads(index_files(store, table)[1].read_text())
    except (OSError, json.JSONDecodeError):
        return None


def save_index(
    store: Store, index: faiss.Index, table: str = IMAGES, plan: ann.IndexPlan | None = None
) -> None:
    """Write the index, then its metadata (generation covered, plan), each atomically."""
    final, meta_path = index_files(store, table)
    on_cpu = faiss.index_gpu_to_cpu(index) if gpu_count() else index
    write_atomic(final, lambda tmp: faiss.write_index(on_cpu, tmp))
    plan = plan or ann.plan_index(int(index.ntotal), store.dim, "flat")
    meta = {
        "generation": store.table_generation(table),
        "ntotal": int(index.ntotal),
        "plan": plan.to_dict(),
        "file": file_check(final),  # size + CRC-32: a damaged index is told on load
    }
    write_atomic(meta_path, json.dumps(meta, indent=2).encode())


def _read_faiss(path: Path, mmap_refine: bool = False) -> faiss.Index:
    if mmap_refine:
        # The plan kept the re-ranking vectors out of the memory budget: map them (and the
        # rest of the flat codes) from the file; the PQ codes are read in.
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:
            log.info("%s can't be memory-mapped; reading it in", path)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 1 << 34
    if path.stat().st_size > MMAP_SHARE * ram:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        except RuntimeError:
            log.info("%s can't be memory-mapped; reading it in", path)
    return faiss.read_index(str(path))


def load_saved(
    store: Store, table: str = IMAGES, any_generation: bool = False, writable: bool = False
):
    """(index, meta) saved for the store's current generation (or any, if asked), or None.

    A reader gets a PQ plan's re-ranking vectors memory-mapped when the plan says so; a
    `writable` copy (for an in-place update) is read into memory."""
    meta = read_meta(store, table)
    path = index_files(store, table)[0]
    if meta is None or not path.is_file():
        return None
    if not any_generation and meta.get("generation") != store.table_generation(table):
        return None
    mmap_refine = not writable and meta.get("plan", {}).get("refine") == "mmap"
    damage = index_damage(store, table, meta)
    if damage is not None:
        log.warning("%s is damaged (%s); rebuilding it from the rows", path, damage)
        return None
    try:
        index = _read_faiss(path, mmap_refine)
    except RuntimeError as e:
        log.warning("%s is damaged (%s); rebuilding it from the rows", path, e)
        return None
    if index.d != store.dim or index.ntotal != meta.get("ntotal"):
        return None
    return index, meta


def index_damage(store: Store, table: str = IMAGES, meta: dict | None = None) -> str | None:
    """Why the saved index file is not the one its metadata recorded (truncated, checksum
    mismatch), or None: fine, absent, or saved before the metadata recorded it."""
    meta = meta if meta is not None else read_meta(store, table)
    path = index_files(store, table)[0]
    if not meta or not path.is_file():
        return None
    return file_damage(path, meta.get("file"))


def load_index(store: Store, table: str = IMAGES) -> faiss.Index:
    """The index a reader searches: the saved one when it covers the current generation;
    while a writer runs, a saved approximate index of an earlier generation (results whose
    row is gone are dropped by the caller); else an exact index rebuilt from the rows."""
    saved = load_saved(store, table)
    if saved is None:
        stale = load_saved(store, table, any_generation=True)
        if stale is not None and stale[1].get("plan", {}).get("kind", "flat") != "flat":
            return stale[0]  # rebuilding an ANN index in a reader would cost minutes
        return build_index(*store.vectors(table))
    return saved[0]


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids), each (Q, k'), with k' = min(k, ntotal); missing slots have id -1."""
    if isinstance(index, ExactVectors):  # a small table, in numpy (exact_small.py)
        return index.search(queries, k)
    k = min(int(k), int(index.ntotal))
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    queries = np.ascontiguousarray(queries, np.float32)
    hnsw = _hnsw_of(index)
    if hnsw is not None and hnsw.hnsw.efSearch < k:
        # HNSW returns at most efSearch neighbours: widen the beam for large k
        params = faiss.SearchParametersHNSW(efSearch=k)
        return index.search(queries, k, params=params)
    scores, ids = index.search(queries, k)
    ivf = _ivf_of(index)
    nprobe = ivf.nprobe if ivf is not None else 0
    # An IVF index returns only what its probed lists hold: when k asks for more than that
    # (k near the collection size), probe more lists rather than return fewer than k.
    while ivf is not None and (ids < 0).any() and nprobe < ivf.nlist:
        nprobe = min(ivf.nlist, nprobe * 4)
        scores, ids = index.search(queries, k, params=ann.ivf_search_params(index, nprobe))
    return scores, ids


def _hnsw_of(index: faiss.Index):
    inner = faiss.downcast_index(index)
    inner = faiss.downcast_index(inner.index) if hasattr(inner, "id_map") else inner
    return inner if hasattr(inner, "hnsw") else None


def _ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def update_index(
    store: Store,
    table: str = IMAGES,
    *,
    kind: str | None = None,
    memory: int | None = None,
    start_generation: int | None = None,
    changed_ids: Iterable[int] | None = None,
    removed: bool = True,
) -> ann.IndexPlan:
    """Bring a table's saved index up to the store's current generation; returns its plan.

    `changed_ids` (ids the run removed, added or replaced) allow an in-place update when the
    saved index covers `start_generation` and its type still fits; otherwise it is rebuilt.
    `kind` None keeps the type asked for last time (default auto).
    """
    meta = read_meta(store, table)
    previous = ann.IndexPlan.from_dict(meta["plan"]) if meta and "plan" in meta else None
    asked = kind or (meta or {}).get("asked", "auto")
    n = store.count(table)
    plan = ann.plan_index(n, store.dim, asked, memory)
    if changed_ids is not None:
        changed_ids = np.fromiter(changed_ids, np.int64)
        if _saved_is_current(store, table, meta, previous, plan, changed_ids, asked):
            return previous
    index = None
    if (
        previous is not None
        and changed_ids is not None
        and previous.kind == plan.kind != "flat"
        and bool(previous.refine) == bool(plan.refine)  # the same faiss structure
        and meta.get("generation") == start_generation
        and n <= ann.RETRAIN_GROWTH * max(previous.trained_n, 1)
        and not (plan.kind == "hnsw" and removed)
    ):
        saved = load_saved(store, table, any_generation=True, writable=True)
        if saved is not None:
            index, _ = saved
            if plan.refine:  # RAM or memory-mapped is the reader's choice, made per run
                previous.refine, previous.bytes_per_vector = plan.refine, plan.bytes_per_vector
            plan = previous
            _apply_changes(store, table, index, np.unique(np.fromiter(changed_ids, np.int64)))
    if index is None:
        ids, vectors = store.vectors(table)
        if plan.kind == "flat":
            index = build_index(ids, vectors)
        else:
            index = ann.build_index(plan, ids, vectors)
    if plan.kind != "flat":
        ids, vectors = store.vectors(table)
        ann.tune(index, plan, vectors, ids)
    save_index(store, index, table, plan)
    meta = read_meta(store, table) or {}
    meta["asked"] = asked
    write_atomic(index_files(store, table)[1], json.dumps(meta, indent=2).encode())
    return plan


def _saved_is_current(store: Store, table: str, meta: dict | None,
                      previous: ann.IndexPlan | None, plan: ann.IndexPlan,
                      changed: np.ndarray, asked: str) -> bool:
    """Whether a run that changed no row of `table` can keep the saved index as it is: it
    covers the table's generation and has the structure the plan asks for (a no-op `vqret
    index` then reads no vector and writes no file)."""
    if meta is None or previous is None or len(changed):
        return False
    same_structure = (previous.kind, previous.factory, previous.refine) == (
        plan.kind, plan.factory, plan.refine)
    return (same_structure and meta.get("asked", "auto") == asked
            and meta.get("generation") == store.table_generation(table)
            and meta.get("ntotal") == store.count(table)
            and index_files(store, table)[0].is_file())


def update_after_write(
    writer,
    table: str = IMAGES,
    *,
    kind: str | None = None,
    memory: int | None = None,
    update: Callable[..., ann.IndexPlan] | None = None,
    **options: Any,
) -> ann.IndexPlan:
    """`update` (default `update_index`) with what a StoreWriter changed in `table` during
    its run; `options` go to `update` (the Ray engine passes its own, sharded, updater)."""
    return (update or update_index)(
        writer.store,
        table,
        kind=kind,
        memory=memory,
        start_generation=writer.start_generation[table],
        changed_ids=writer.changed_ids(table),
        removed=bool(writer.removed[table]),
        **options,
    )


def _apply_changes(store: Store, table: str, index: faiss.Index, wanted: np.ndarray) -> None:
    if not len(wanted):
        return
    if ann.refine_of(index) is not None:
        # IndexRefine can't remove ids: when any indexed vector changed, empty the trained
        # index and add every row again (no retraining); pure additions are appended.
        if np.isin(faiss.vector_to_array(index.id_map), wanted).any():
            index.reset()
            ids, vectors = store.vectors(table)
            for start in range(0, len(ids), 100_000):
                index.add_with_ids(vectors[start : start + 100_000], ids[start : start + 100_000])
            return
    else:
        index.remove_ids(faiss.IDSelectorBatch(wanted))
    rows = store.rows_by_id(wanted.tolist(), columns=["id", "embedding"], table=table)
    if rows:
        ids = np.fromiter(rows.keys(), dtype=np.int64)
        vectors = np.asarray([rows[i]["embedding"] for i in ids], dtype=np.float32)
        index.add_with_ids(vectors, ids)
