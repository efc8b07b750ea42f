"""Approximate nearest-neighbour indexes: pick a FAISS index type, train it, tune it to a recall.

The choice follows autofaiss' reasoning (exact while it's cheap, then the index that fits the
memory budget), with one difference: the search parameter (nprobe / efSearch) is tuned to a
*recall* target, measured against exact search on a held-out sample of the collection's own
vectors, not to a latency target. Users of a retrieval tool notice missing results before
they notice 2 ms.

Bytes per vector (d = 512): Flat 2048 | HNSW32 2048 + 256 | IVF,SQfp16 1024 + 8 |
IVF,SQ8 512 + 8 | IVF,PQ64 64 + 8 (+ 8 for the id map and 2048 for the exact re-ranking).

Product quantization alone tops out near recall@10 0.5 at d = 512 (64 bytes can't tell close
neighbours apart), so PQ plans re-rank: faiss' IndexRefineFlat asks the PQ index for
k_factor x k candidates and re-scores them with the float32 vectors (Jegou et al., "Searching
in one billion vectors: re-rank with source coding", ICASSP 2011). Where those vectors don't
fit the memory budget (always, when auto chose PQ for want of memory) they stay in the index
file and are memory-mapped: a query touches only its k_factor x k rows, and the budget counts
the PQ codes alone (the plan says so).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .lazy_import import lazy_import

# loaded on first use: a no-op `vqret index` and `--index-memory` parsing need no faiss
faiss = lazy_import("faiss")

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
EXACT_BELOW = 20_000  # under this, exact search takes about a millisecond: no reason to approximate
MIN_TRAIN = 256  # fewer vectors can't train a quantizer worth having
RETRAIN_GROWTH = 4.0  # retrain the coarse quantizer once the collection is this many times larger
HNSW_M = 32
# OPQ's training is ~64 small k-means per iteration: faiss' defaults (50 iterations, 40 on the
# first, up to 65k points) took 155 s on 20k x 512 on 2 cores, 13x plain PQ. These keep most
# of its gain (recall@10 0.67 -> 0.75 at 40k x 512 vs plain PQ64) at 2x plain PQ's time.
OPQ_NITER = 10
OPQ_TRAIN_POINTS = 16_384
# Tuning stops raising nprobe / efSearch once recall@10 gains less than this (4 of the 2000
# neighbours of the 200 tuning queries): product quantization tops out near 0.8 at d = 512.
TUNE_PLATEAU = 0.002
# Shortlist sizes (x k) tried for the exact re-ranking of PQ plans, smallest first: re-scoring
# 10 x 64 float32 vectors costs ~0.1 ms, far less than probing the lists that found them.
REFINE_K_FACTORS = (1, 2, 4, 8, 16, 32, 64)
REFINE_MODES = ("ram", "mmap")  # where the re-ranking vectors live


def default_memory_budget() -> int:
    """A quarter of the machine's RAM (bytes): the index must leave room for everything else."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return total // 4


def parse_bytes(text: str | int) -> int:
    """'4G', '512M', '1.5GB', 1000 -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    number = s[:-1] if s[-1:] in "KMGT" else s
    try:
        size = int(float(number) * scale)
    except (ValueError, OverflowError):  # OverflowError: 'inf'
        raise ValueError(f"not a size: {text!r} (try 4G or 512M)") from None
    if size <= 0:
        raise ValueError(f"not a size: {text!r} (must be positive)")
    return size


@dataclass
class IndexPlan:
    kind: str  # flat | hnsw | ivf | ivfpq
    factory: str  # faiss.index_factory string
    bytes_per_vector: float
    reason: str
    nlist: int = 0
    params: dict[str, int] = field(default_factory=dict)  # tuned search parameters
    trained_n: int = 0  # collection size when the quantizer was trained
    recall_at_10: float | None = None  # measured against exact search
    query_ms: float | None = None  # single query, tuned parameters
    rebuild_rule: str = ""
    # PQ plans: "" (no re-ranking), "ram" (float32 vectors in memory, counted in the budget)
    # or "mmap" (memory-mapped from the index file, outside the budget)
    refine: str = ""

    @property
    def faiss_factory(self) -> str:
        """The full index_factory string: `factory`, behind an id map and a re-ranking stage
        when the plan re-ranks (IndexRefine keeps positions, so the ids live in IDMap)."""
        return f"IDMap,{self.factory},RFlat" if self.refine else self.factory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexPlan:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _nlist_for(n: int) -> int:
    # ~4 sqrt(N) lists, a power of two, at least 39 training points per list (faiss' floor)
    nlist = 2 ** round(math.log2(max(16, 4 * math.sqrt(n))))
    return int(max(1, min(nlist, n // 39, 1 << 18)))


def sq_code_bytes(bits: int, dim: int) -> int:
    """Bytes of one vector's scalar-quantizer code (faiss SQ8, SQ6, SQ4)."""
    return (bits * dim + 7) // 8


def plan_index(
    n: int, dim: int, kind: str = "auto", memory: int | None = None, refine: bool = True
) -> IndexPlan:
    """The index for n vectors of dimension `dim` within `memory` bytes.

    PQ plans re-rank exactly unless `refine` is False: in RAM when the float32 vectors fit the
    budget beside the codes, else memory-mapped from the index file (see the module notes).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index type {kind!r}: use one of {', '.join(KINDS)}")
    memory = memory or default_memory_budget()
    nlist = _nlist_for(n)
    # At most 64 sub-quantizers (64 bytes at d = 512, as above); at d < 16 the smaller ones
    # (a bare max() over (8, ...) raised ValueError for every index type, flat included).
    pq_m = max((m for m in (2, 4, 8, 16, 32, 48, 64) if dim % m == 0 and m <= dim // 2),
               default=1)
    if kind == "auto":
        if n < EXACT_BELOW:
            kind, why = "flat", f"{n} vectors: exact search is already fast"
        elif n * (2 * dim + 16) <= memory:
            kind, why = "ivf", f"IVF with fp16 vectors fits {memory >> 20} MiB"
        elif n * (dim + 16) <= memory:
            kind, why = "ivf8", f"IVF with 8-bit vectors fits {memory >> 20} MiB"
        # Without re-ranking (sharded builds), 64-byte PQ codes stop near recall@10 0.5-0.65
        # at any nprobe; 6- and 4-bit scalar codes reach ~0.95 and ~0.82 (benchmarks/README).
        elif not refine and n * (sq_code_bytes(6, dim) + 16) <= memory:
            kind, why = "ivf6", f"IVF with 6-bit vectors fits {memory >> 20} MiB"
        elif not refine and n * (sq_code_bytes(4, dim) + 16) <= memory:
            kind, why = "ivf4", f"IVF with 4-bit vectors fits {memory >> 20} MiB"
        else:
            kind, why = "ivfpq", f"only product quantization fits {memory >> 20} MiB"
    elif n < MIN_TRAIN and kind in ("ivf", "ivfpq"):
        kind, why = "flat", f"{kind} asked for, but {n} vectors are too few to train it"
    else:
        why = "asked for"
    rule = "incremental add and remove (IVF lists keep ids)"
    if kind == "flat":
        return IndexPlan("flat", "IDMap2,Flat", dim * 4 + 8, why,
                         rebuild_rule="exact: rebuilt from the rows on every change (cheap)")
    if kind == "hnsw":
        return IndexPlan(
            "hnsw", f"IDMap2,HNSW{HNSW_M}", dim * 4 + HNSW_M * 2 * 4 + 8, why,
            rebuild_rule="adds are incremental; HNSW can't remove, so removals rebuild it",
        )
    if kind == "ivf":
        return IndexPlan("ivf", f"IVF{nlist},SQfp16", dim * 2 + 8, why, nlist=nlist,
                         rebuild_rule=rule + f"; retrained at {RETRAIN_GROWTH:g}x growth")
    for bits in (8, 6, 4):
        if kind == f"ivf{bits}":
            return IndexPlan("ivf", f"IVF{nlist},SQ{bits}", sq_code_bytes(bits, dim) + 8, why,
                             nlist=nlist,
                             rebuild_rule=rule + f"; retrained at {RETRAIN_GROWTH:g}x growth")
    # 8-bit PQ (and OPQ, which trains one) needs ~10k training points (256 centroids x 39);
    # smaller sets use 4-bit PQ without the rotation
    big = n >= 10_000
    # "np": no polysemous training, which index_factory turns on for IVF-PQ (230 s on 20k x 512
    # here, 12 s without); it only serves Hamming-filtered search, which we don't use.
    factory = f"OPQ{pq_m},IVF{nlist},PQ{pq_m}x8np" if big else f"IVF{nlist},PQ{pq_m}x4np"
    codes = pq_m * (8 if big else 4) / 8 + 8
    retrain = f"; retrained at {RETRAIN_GROWTH:g}x growth"
    if not refine:
        return IndexPlan("ivfpq", factory, codes, why, nlist=nlist,
                         rebuild_rule=rule + retrain)
    codes += 8  # IDMap's id per vector: inside IndexRefine the IVF lists hold positions
    exact = 4 * dim
    if n * (codes + exact) <= memory:
        mode, bytes_per_vector = "ram", codes + exact
        how = f"re-ranked with float32 vectors in RAM ({exact} B each)"
    else:
        mode, bytes_per_vector = "mmap", codes
        how = (f"re-ranked with float32 vectors memory-mapped from the index file "
               f"({exact} B each on disk, outside the {memory >> 20} MiB budget)")
    return IndexPlan(
        "ivfpq", factory, bytes_per_vector, f"{why}; {how}", nlist=nlist, refine=mode,
        # IndexRefine can't remove: removals re-add every vector to the trained index
        rebuild_rule="adds are incremental; removals re-add all vectors (re-ranking can't "
        "remove) without retraining" + retrain,
    )


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _training_sample(vectors: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    # faiss warns below 39 and gains little above ~64 points per centroid
    n = min(len(vectors), max(64 * nlist, 10_000))
    if n == len(vectors):
        return vectors
    rng = np.random.default_rng(seed)
    return vectors[np.sort(rng.choice(len(vectors), n, replace=False))]


def new_index(plan: IndexPlan, dim: int) -> faiss.Index:
    """The empty, untrained index of `plan`, with vqret's (shorter) training settings."""
    index = faiss.index_factory(dim, plan.faiss_factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind not in ("ivf", "ivfpq"):
        return index
    faiss.extract_index_ivf(index).cp.niter = 10  # recall is recovered by nprobe tuning
    refine = refine_of(index)
    # behind a re-ranking stage the OPQ rotation sits in its base index (missing it there
    # meant faiss' default OPQ training: 568 s instead of ~50 s at 100k x 512)
    pre = faiss.downcast_index(refine.base_index) if refine is not None else index
    if isinstance(pre, faiss.IndexPreTransform):
        for i in range(pre.chain.size()):
            opq = faiss.downcast_VectorTransform(pre.chain.at(i))
            if isinstance(opq, faiss.OPQMatrix):
                opq.niter = opq.niter_pq_0 = OPQ_NITER
                opq.max_train_points = OPQ_TRAIN_POINTS
    return index


def build_index(plan: IndexPlan, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """Train (on a sample) and fill the index of `plan`; vectors are addressed by `ids`."""
    dim = vectors.shape[1]
    vectors = np.ascontiguousarray(vectors, np.float32)
    index = new_index(plan, dim)
    if plan.kind in ("ivf", "ivfpq"):
        started = time.perf_counter()
        index.train(_training_sample(vectors, plan.nlist))
        log.info("trained %s in %.1f s", plan.factory, time.perf_counter() - started)
        plan.trained_n = len(vectors)
    if len(ids):
        for start in range(0, len(ids), 100_000):  # bounded temporary memory while adding
            end = start + 100_000
            index.add_with_ids(vectors[start:end], ids[start:end].astype(np.int64))
    set_search_params(index, plan.params)
    return index


def refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    """The re-ranking stage of a PQ plan's index (IDMap -> IndexRefine), or None."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexRefine) else None


def ivf_search_params(index: faiss.Index, nprobe: int) -> faiss.SearchParameters:
    """Per-call search parameters probing `nprobe` lists; behind a re-ranking stage they are
    wrapped (IndexRefine refuses bare IVF parameters) and keep its k_factor."""
    ivf = faiss.SearchParametersIVF(nprobe=int(nprobe))
    refine = refine_of(index)
    if refine is None:
        return ivf
    params = faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=ivf)
    params.ivf_ref = ivf  # the wrapper holds a raw pointer: keep the IVF one alive with it
    return params


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "k_factor" in params:
        refine_of(index).k_factor = float(params["k_factor"])
    if "efSearch" in params:
        hnsw = faiss.downcast_index(faiss.downcast_index(index).index)
        hnsw.hnsw.efSearch = int(params["efSearch"])


def build_ann_for_vectors(vectors: np.ndarray, kind: str = "auto") -> faiss.Index:
    """An index over positions 0..N-1, tuned: for evaluating recall through an index."""
    plan = plan_index(len(vectors), vectors.shape[1], kind)
    ids = np.arange(len(vectors), dtype=np.int64)
    index = build_index(plan, ids, vectors)
    tune(index, plan, vectors)
    return index


# --------------------------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------------------------


def _ground_truth(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    # faiss.knn scans `vectors` in place; an IndexFlatIP would copy them (2 GiB at 1M x 512)
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]  # positions


def _without_self(neighbours: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """(Q, k): each row's first k neighbours other than the query itself. The tuning queries
    are members of the collection; dropping them from both sides makes each a held-out query
    (otherwise every query finds itself, and recall@10 reads 0.1 x (1 - recall) too high:
    0.005 at 0.95, 0.05 for product quantization's ~0.5 at 1M x 512)."""
    return np.stack([row[row != me][:k] for row, me in zip(neighbours, own, strict=True)])


def recall_vs_exact(found: np.ndarray, truth: np.ndarray) -> float:
    """k-recall@k: the share of the exact top-k that the index also returns in its top-k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def tune(
    index: faiss.Index,
    plan: IndexPlan,
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
    target: float = 0.95,
    n_queries: int = 200,
    seed: int = 0,
) -> IndexPlan:
    """Raise nprobe / efSearch until recall@10 vs exact reaches `target`; record both.

    The queries are a sample of the collection's own vectors, each held out of its own
    results (leave-one-out), so the recall is what a query from outside the collection gets.
    """
    if plan.kind == "flat" or len(vectors) < 2:
        plan.recall_at_10, plan.params = 1.0, {}
        return plan
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), min(n_queries, len(vectors)), replace=False)
    queries = np.ascontiguousarray(vectors[pick], np.float32)
    k = min(10, len(vectors) - 1)
    own = pick if ids is None else ids[pick]
    truth_pos = _ground_truth(np.ascontiguousarray(vectors, np.float32), queries, k + 1)
    neighbours = truth_pos if ids is None else ids[truth_pos]
    return tune_to_truth(index, plan, queries, own, neighbours, target)


def tune_to_truth(
    index: faiss.Index,
    plan: IndexPlan,
    queries: np.ndarray,
    own: np.ndarray,
    neighbours: np.ndarray,
    target: float = 0.95,
) -> IndexPlan:
    """`tune` against exact neighbours found elsewhere: `neighbours` (Q, k+1) are the ids of
    each query's exact top-(k+1), the query itself among them (its id in `own`). For builds
    in which no process holds every vector: the Ray engine's sharded build merges its shards'
    top lists into these."""
    if not len(queries):
        plan.recall_at_10, plan.params = None, {}
        return plan
    k = neighbours.shape[1] - 1
    truth = _without_self(neighbours, own, k)
    if plan.kind == "hnsw":
        name, values = "efSearch", [16, 32, 64, 128, 256, 512, 1024]
    else:
        name = "nprobe"
        # ending on all lists when there are few: IVF over fp16 or 8-bit vectors then always
        # reaches the target (all lists probed ~ exact search)
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v < plan.nlist]
        values += [plan.nlist] if plan.nlist <= 1024 else []

    def recall_with(params: dict[str, int]) -> float:
        set_search_params(index, params)
        return recall_vs_exact(_without_self(index.search(queries, k + 1)[1], own, k), truth)

    # Re-ranking: lists are probed with the widest shortlist, so nprobe is raised until the
    # *candidates* are good enough; then the shortlist is cut to the smallest that keeps it.
    wide = {"k_factor": REFINE_K_FACTORS[-1]} if refine_of(index) is not None else {}
    best, best_recall = values[0], -1.0
    for value in values:
        recall = recall_with({name: value, **wide})
        if recall < best_recall + TUNE_PLATEAU:
            break  # PQ's ceiling: probing more lists would only cost time
        best, best_recall = value, recall
        if recall >= target:
            break
    plan.params = {name: best}
    if wide:
        enough = min(target, best_recall - TUNE_PLATEAU)
        for k_factor in REFINE_K_FACTORS:
            recall = recall_with({name: best, "k_factor": k_factor})
            if recall >= enough or k_factor == REFINE_K_FACTORS[-1]:
                plan.params["k_factor"], best_recall = k_factor, recall
                break
    set_search_params(index, plan.params)
    plan.recall_at_10 = round(best_recall, 4)
    plan.query_ms = round(single_query_ms(index, queries[:50], k), 3)
    return plan


def single_query_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> float:
    """Median latency of one query at a time (what an interactive search pays)."""
    times = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000) if times else 0.0
