"""Building a big table's IVF index on Ray, shard by shard: no process holds all raw vectors.

Train the IVF quantizer on a sample, add the vectors of the store's Parquet parts shard by
shard in parallel Ray tasks, merge the shards' inverted lists into one index, tune nprobe
against the exact top-k the shards found. `ray_update_after_write` is the Ray engine's
`index_updater`: big IVF tables are built here, the rest as the local engine builds them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import ann
from ..index import (
    index_damage,
    index_files,
    load_saved,
    read_meta,
    save_index,
    update_after_write,
    update_index,
)
from ..store import IMAGES, Store, StoreWriter, embeddings_from_arrow, write_atomic
from .cluster import connect, require_ray

log = logging.getLogger(__name__)

# Below this many rows one process trains and fills an IVF index in minutes; a cluster job
# (start-up, shipping shards) would cost more than it saves.
SHARDED_ABOVE = 2_000_000


def _part_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def iter_part_vectors(
    paths: Iterable[str], dim: int, rows: int = 65_536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of Parquet parts, `rows` at a time: a shard never sits in memory whole."""
    import pyarrow.parquet as pq

    for path in paths:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=rows, columns=["id", "embedding"]):
            ids = batch.column("id").to_numpy().astype(np.int64, copy=False)
            yield ids, np.ascontiguousarray(embeddings_from_arrow(batch.column("embedding"), dim))


def _sample_rows(
    paths: list[str], dim: int, take: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of `take` random rows of these parts (fewer if they hold fewer)."""
    rng = np.random.default_rng(seed)
    total = sum(_part_rows(Path(p)) for p in paths)
    take = min(take, total)
    chosen = np.sort(rng.choice(total, take, replace=False)) if take else np.zeros(0, np.int64)
    out_ids, out, offset = [], [], 0
    for ids, vectors in iter_part_vectors(paths, dim):
        here = chosen[(chosen >= offset) & (chosen < offset + len(vectors))] - offset
        out_ids.append(ids[here])
        out.append(vectors[here])
        offset += len(vectors)
    if not out:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate(out_ids), np.concatenate(out)


def _add_shard(
    trained: np.ndarray, paths: list[str], dim: int, queries: np.ndarray, k: int, out: str
) -> dict[str, Any]:
    """Fill a copy of the trained (empty) index with these parts' vectors, written to `out`.

    Also the exact top-k of the tuning queries within the shard, so recall can be measured
    against exact search without any process seeing the whole collection. The shard goes
    back as a file beside the parts, not as bytes through Ray's object store: the driver then
    reads it once (`read_index`), where deserializing held the bytes and two copies at once.
    """
    import faiss

    index = faiss.deserialize_index(trained)
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    rows = 0
    for ids, vectors in iter_part_vectors(paths, dim):
        index.add_with_ids(vectors, ids)
        rows += len(ids)
        if len(queries):
            scores, pos = faiss.knn(queries, vectors, min(k, len(vectors)),
                                    metric=faiss.METRIC_INNER_PRODUCT)
            best_scores, best_ids = merge_topk(best_scores, best_ids, scores, ids[pos], k)
    faiss.write_index(index, out)
    return {
        "index": out,
        "scores": best_scores,
        "ids": best_ids,
        "rows": rows,
    }


def merge_topk(
    scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k (scores, ids), each (Q, k), of two top lists of the same Q queries, e.g. of
    two shards: exact search over all vectors, merged part by part."""
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    # ties broken by id, so that the merge order of shards can't change the answer
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _shards(paths: list[str], rows_per_shard: int) -> list[list[str]]:
    """Consecutive parts grouped to about `rows_per_shard` rows (a bigger part: a shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for path in paths:
        n = _part_rows(Path(path))
        if shards[-1] and size + n > rows_per_shard:
            shards.append([])
            size = 0
        shards[-1].append(path)
        size += n
    return [s for s in shards if s]


def merge_into(merged: Any, shard: Any) -> None:
    """Move `shard`'s inverted lists into `merged` (same trained quantizer; ids kept)."""
    # IndexIVF.merge_from moves list by list; IndexPreTransform (OPQ, PCA) forwards to its IVF.
    merged.merge_from(shard, 0)


def build_sharded_index(
    store: Store,
    kind: str = "auto",
    memory: int | None = None,
    *,
    rows_per_shard: int = 1_000_000,
    train_size: int | None = None,
    reuse_trained: bool = False,
    target: float = 0.95,
    n_queries: int = 200,
    seed: int = 0,
    address: str | None = None,
    table: str = IMAGES,
) -> ann.IndexPlan:
    """Build and save the IVF index of a big table with Ray tasks; returns its plan.

    1. sample: tasks draw a uniform random sample (training set + tuning queries) from the
       shards, in proportion to their rows;
    2. train the quantizer on the sample (this process; on a GPU node, faiss-gpu trains it
       fastest). With `reuse_trained`, a saved index of the same factory that was trained on
       at least 1/RETRAIN_GROWTH of today's rows keeps its training (emptied, not retrained);
    3. add: one task per shard (~`rows_per_shard` rows of consecutive Parquet parts, read
       64k rows at a time) fills a copy of the trained index and finds the exact top-10 of
       the tuning queries in its shard;
    4. merge: this process moves each shard's inverted lists into one index as the tasks
       finish, then tunes nprobe to `target` recall@10 against the merged exact top-10.

    Memory: a task holds one read batch and its shard's codes; this process holds the
    sample, the merged index (the codes search needs anyway) and one shard in flight. The
    tasks read the parts from the store folder, so on a multi-node cluster the store must be
    on storage every node mounts. Call it holding the store's writer (`store.writer()`),
    as the Indexer does, so that no part disappears underneath.
    """
    ray = require_ray()
    connect(address)
    started = time.perf_counter()
    dim = store.dim
    paths = [str(store.path / table / name) for name in store.parts(table)]
    n = sum(_part_rows(Path(p)) for p in paths)
    # No exact re-ranking for sharded PQ builds: IndexRefine addresses its float32 vectors by
    # position, and the shards' positions would have to be renumbered while merging.
    plan = ann.plan_index(n, dim, kind, memory, refine=False)
    if plan.kind not in ("ivf", "ivfpq"):
        raise ValueError(
            f"sharded building makes IVF indexes (ivf, ivfpq); {n} rows with --index {kind} "
            f"gives {plan.kind}: use update_index for it"
        )
    shards = _shards(paths, rows_per_shard)
    rows = [sum(_part_rows(Path(p)) for p in s) for s in shards]

    trained = None
    if reuse_trained:
        trained, previous = _reusable_trained(store, table, plan, n)
        plan = previous or plan
    want = n_queries if trained is not None else max(
        train_size or min(n, max(64 * plan.nlist, 10_000)), n_queries
    )
    rng = np.random.default_rng(seed)
    sample_ids, sample = _draw_sample(ray, shards, rows, dim, want, rng)
    pick = np.sort(rng.choice(len(sample), min(n_queries, len(sample)), replace=False))
    queries = np.ascontiguousarray(sample[pick], np.float32)
    query_ids = sample_ids[pick]

    if trained is None:
        # ann.build_index with no ids only trains: the same factory settings (k-means and OPQ
        # iterations, training-set size) as the in-process build, by construction.
        trained = ann.build_index(plan, np.zeros(0, np.int64), sample)
        plan.trained_n = n
    del sample, sample_ids
    # The queries are members of the collection: k+1 neighbours, then each drops itself.
    k = min(10, n - 1) + 1
    merged, truth_ids = _fill_and_merge(ray, store, trained, shards, dim, queries, k)
    if merged is None or merged.ntotal != n:
        raise RuntimeError(f"sharded build: {0 if merged is None else merged.ntotal} of {n} "
                           "vectors after merging; the store changed underneath?")
    ann.tune_to_truth(merged, plan, queries, query_ids, truth_ids, target)
    save_index(store, merged, table, plan)
    # What update_index records too: the type asked for, kept by later runs without --index.
    meta = read_meta(store, table) or {}
    meta["asked"] = kind
    write_atomic(index_files(store, table)[1], json.dumps(meta, indent=2).encode())
    log.info("sharded %s: %d rows in %d shards, %.1f s", plan.factory, n, len(shards),
             time.perf_counter() - started)
    return plan


def _draw_sample(
    ray: Any, shards: list[list[str]], rows: list[int], dim: int, want: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of `want` rows drawn uniformly by Ray tasks, each shard's share in
    proportion to its rows."""
    sample_task = ray.remote(num_cpus=1)(_sample_rows)
    refs = [
        sample_task.remote(s, dim, q, int(rng.integers(1 << 31)))
        for s, q in zip(shards, _proportional(want, rows), strict=True)
        if q
    ]
    drawn = ray.get(refs)
    return np.concatenate([d[0] for d in drawn]), np.concatenate([d[1] for d in drawn])


def _fill_and_merge(
    ray: Any, store: Store, trained: Any, shards: list[list[str]], dim: int,
    queries: np.ndarray, k: int,
) -> tuple[Any, np.ndarray]:
    """(the merged index or None, the queries' exact top-k ids): one Ray task per shard fills
    a copy of `trained`; each shard is merged here as its task finishes."""
    import faiss

    trained_ref = ray.put(faiss.serialize_index(trained))
    queries_ref = ray.put(queries)
    add_task = ray.remote(num_cpus=1)(_add_shard)
    # ".tmp-" files: a writer that starts after a killed build removes them (StoreWriter)
    outs = [str(store.path / f".tmp-shard-{uuid.uuid4().hex[:8]}-{i}.faiss")
            for i in range(len(shards))]
    pending = [add_task.remote(trained_ref, s, dim, queries_ref, k, out)
               for s, out in zip(shards, outs, strict=True)]
    merged = None
    truth_scores = np.full((len(queries), k), -np.inf, np.float32)
    truth_ids = np.full((len(queries), k), -1, np.int64)
    try:
        while pending:
            # Merge whichever shard is ready first: one shard in flight here, not all.
            ready, pending = ray.wait(pending, num_returns=1)
            result = ray.get(ready[0])
            shard = faiss.read_index(result["index"])
            Path(result["index"]).unlink()
            if merged is None:
                merged = shard
            else:
                merge_into(merged, shard)
            truth_scores, truth_ids = merge_topk(
                truth_scores, truth_ids, result["scores"], result["ids"], k
            )
            del shard, result
    finally:
        for out in outs:  # a failed task's, or those a failure left unmerged
            Path(out).unlink(missing_ok=True)
    return merged, truth_ids


def _proportional(total: int, weights: list[int]) -> list[int]:
    whole = sum(weights)
    if not whole:
        return [0] * len(weights)
    exact = [total * w / whole for w in weights]
    quota = [min(int(e), w) for e, w in zip(exact, weights, strict=True)]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - quota[i], reverse=True)
    for i in by_remainder[: total - sum(quota)]:
        quota[i] = min(quota[i] + 1, weights[i])
    return quota


def _reusable_trained(
    store: Store, table: str, plan: ann.IndexPlan, n: int
) -> tuple[Any, ann.IndexPlan | None]:
    """(the saved index emptied, its plan) when its quantizer still serves `n` rows, the rule
    update_index follows (same kind, at most RETRAIN_GROWTH x the rows it was trained on);
    else (None, None)."""
    meta = read_meta(store, table)
    if meta is None or "plan" not in meta:
        return None, None
    previous = ann.IndexPlan.from_dict(meta["plan"])
    if previous.kind != plan.kind or n > ann.RETRAIN_GROWTH * max(previous.trained_n, 1):
        return None, None
    saved = load_saved(store, table, any_generation=True)
    if saved is None:
        return None, None
    index = saved[0]
    index.reset()  # drops the vectors, keeps the trained quantizer (and an OPQ rotation)
    return index, previous


def ray_update_index(
    store: Store,
    table: str = IMAGES,
    *,
    kind: str | None = None,
    memory: int | None = None,
    start_generation: int | None = None,
    changed_ids: Iterable[int] | None = None,
    removed: bool = True,
    sharded_above: int = SHARDED_ABOVE,
    rows_per_shard: int = 1_000_000,
) -> ann.IndexPlan:
    """`update_index` (same arguments), built on Ray when the table is big.

    Small tables, texts and non-IVF plans (exact, HNSW) go to `update_index` as they are.
    Big IVF tables are rebuilt in parallel (`build_sharded_index`), keeping the trained
    quantizer while the table is within RETRAIN_GROWTH of the size it was trained at:
    `update_index`'s in-place path reads every vector into one process to re-tune, which
    is what a big table can't afford.
    """
    meta = read_meta(store, table)
    asked = kind or (meta or {}).get("asked", "auto")
    n = store.count(table)
    plan = ann.plan_index(n, store.dim, asked, memory, refine=False)
    if table != IMAGES or n < sharded_above or plan.kind not in ("ivf", "ivfpq"):
        return update_index(
            store,
            table,
            kind=kind,
            memory=memory,
            start_generation=start_generation,
            changed_ids=changed_ids,
            removed=removed,
        )
    if (meta is not None and meta.get("generation") == store.table_generation(table)
            and index_damage(store, table, meta) is None):
        return ann.IndexPlan.from_dict(meta["plan"])  # nothing changed since it was saved
    return build_sharded_index(
        store, asked, memory, rows_per_shard=rows_per_shard, reuse_trained=True, table=table
    )


def ray_update_after_write(
    writer: StoreWriter,
    table: str = IMAGES,
    *,
    kind: str | None = None,
    memory: int | None = None,
    **options: Any,
) -> ann.IndexPlan:
    """`index.update_after_write`, built on Ray when the table is big: the Indexer's
    `index_updater` for the Ray engine. `options`: ray_update_index's (sharded_above, ...)."""
    return update_after_write(
        writer, table, kind=kind, memory=memory, update=ray_update_index, **options
    )


__all__ = [
    "SHARDED_ABOVE",
    "build_sharded_index",
    "iter_part_vectors",
    "merge_into",
    "merge_topk",
    "ray_update_after_write",
    "ray_update_index",
]
