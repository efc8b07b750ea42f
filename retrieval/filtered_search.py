"""Filtered search: the top-k among the rows a filter passes, at any selectivity.

Why one long file: the two routes, the planner that picks between them and the IVF-list
bookkeeping read the same picture of the index (its layout, its lists, where a filter's rows
sit) and share one cost model; about a sixth of it is the measurements that cost model rests on.

Arrays in, arrays out: the caller turns a filter into the ids of the passing rows (DuckDB over
the store's rows) and `search_filtered(index, queries, k, allowed)` returns their best k,
scored as `search_index` scores. It never returns fewer than min(k, passing rows the index
holds), and on an exact index they are the exact filtered top-k. `Allowed` is a filter
prepared for search (distinct ids, a bitmap, a faiss selector, where its rows sit in an IVF
index's lists); a caller that keeps it for the queries of one filter pays that once.

Two routes, chosen per call by estimated cost (`_plan`, `COSTS`):
- **exact**: score every passing row in float32. The vectors come from the index when it
  holds them (IDMap2 over Flat or HNSWFlat: `reconstruct_batch` by id; a PQ plan's
  re-ranking vectors, by position), else from `vectors_of(ids)`, the store rows' embeddings.
- **ann**: the index's own search with a faiss ID selector (`IDSelectorBitmap`, or a hash
  set `IDSelectorBatch` for ids too sparse for a bitmap). IDMap / IDMap2 translate a
  selector of ids to positions for the search under them (faiss >= 1.7.4), but IndexRefine
  (PQ plans: IDMap -> IndexRefineFlat -> OPQ,IVF-PQ) passes only its nested IVF parameters
  on, where a selector of ids would test positions: the selector is built over the
  positions of the id map instead (O(ntotal)). Flat: exact by construction.

Widening. A filter passing a share s of the rows is a sparser collection: its 10 nearest rows
lie as far out as the unfiltered 10/s nearest, in more IVF lists and further along an HNSW
graph. nprobe and efSearch are widened up front to `tuned x s^-a` and the search is repeated
4x wider for any query still short of min(k, passing) hits; once every IVF list is probed
every passing row has been seen, and an HNSW beam past `HNSW_EF_CAP` hands over to the exact
route. a was measured on the CLIP-like mixture of benchmarks/ann_data.py (d = 512, one
thread, 2 shared cores), recall@10 against exact filtered search, filters passing rows at
random (capture-time windows):

    IVF4096,SQfp16 at 1M (tuned nprobe 16)   0.3%    1%     3%    10%    50%
      a = 0.4   recall@10                   0.998  0.998  0.998  0.997  0.984
                latency / unfiltered        1.02x  1.15x  1.04x  1.10x  1.25x
      a = 0.5                               1.000  0.999  1.000  0.998  0.987
                                            1.47x  1.43x  1.21x  1.19x  1.28x
    HNSW32 at 100k (tuned efSearch 64)      0.3%    1%     3%    10%    50%
      efSearch for recall@10 >= 0.97        4096   2048    512    128    128   (a ~ 0.6)

a = 0.5 for IVF keeps a margin over 0.95 at smaller collections (at 100k, s^-0.5 gives
0.988 at 1%), and 0.6 for HNSW.

Filters that gather (an album, a folder of one trip): their rows fill a few IVF lists, often
far from the query, and a probe in the quantizer's order meets lists without a passing row
first. With the index's ids known per list (`_lists`, read once per index object) a filter
knows how many passing rows each list holds (`Allowed.in_lists`, once per filter), and the
IVF search then orders and probes only the lists that hold some (scoring only their
centroids when they are fewer than half the lists): `planned` of them, x 1/spread up to 3x,
where spread is the lists holding passing rows over those an evenly spread filter of the same
size would reach (~1 for rows at random, ~0.02 for 1% of the rows nearest one subject), and
for such a filter also as many passing rows as `planned` lists of an even one hold. Recall@10
at 1M for the s of the rows nearest a random subject (`vqret bench filter`, subject family):
1.000 at 1%, 0.966 at 10%, 0.993 at 50%; without the spread factor it was 0.70-0.93 at
1-10% (100k).

The choice between routes, measured at 1M x 512 under IVF4096,SQfp16 (benchmarks/README,
"Filtered search"): the exact route costs ~0.7 us a passing row (2 KB gathered from the
store's rows in arbitrary order, memory-bound: 0.70 ms for 1,000 rows, 14.8 ms for 10,000,
where the gather grows to 1.5 us a row), the index's route a fixed ~0.15 ms, 85 ns a centroid
scored, ~1 us a list probed, ~8 ns a code tested against the selector and ~110 ns a passing
code scored (0.36-1.4 ms from 0.01% to 1%). Exact wins up to a few thousand passing rows
for filters at random (2,000 still, 5,000 not); a gathered filter probes few lists and the
index's route wins earlier (0.31 ms against 0.77 ms exact for the 1,000 rows nearest a
subject), which the estimate sees through `in_lists`. Both routes return exact-or-near
results where chosen, so a wrong guess of the crossover costs time, never results.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import faiss
import numpy as np

from .index import search_index

VectorsOf = Callable[[np.ndarray], np.ndarray]

ROUTES = ("auto", "exact", "ann")
# The widening of nprobe / efSearch for a filter passing a share s: x s^-exponent (notes)
WIDEN_EXPONENT = {"ivf": 0.5, "refine": 0.5, "hnsw": 0.6}
WIDEN_STEP = 4  # re-search this much wider while a query has fewer than k passing hits
HNSW_EF_CAP = 16_384  # past this beam the exact route is cheaper at any collection size
EVEN_SPREAD = 0.9  # spread of a filter that passes rows at random: ~1
SUB_QUANTIZER_SHARE = 0.5  # under this share of lists holding passing rows, score theirs
SPREAD_MAX = 3.0  # a filter gathered in few lists is probed up to 3x deeper (module notes)
# Nanoseconds at d = 512 (module notes); terms marked "d" scale with the dimension.
COSTS = {
    "exact_fixed": 50_000.0,  # one exact-route call (Python, allocations)
    "exact_row": 700.0,  # d: gather + score one passing row
    "ann_fixed": 150_000.0,  # one index-route call (Python, the quantizer call, heaps)
    "centroid": 85.0,  # d: one IVF centroid scored
    "ivf_list": 1000.0,  # one IVF list probed (its scanner set up, first cache misses)
    "selector": 8.0,  # one IVF code tested against the selector
    "ivf_code": 110.0,  # d: one passing code scored (fp16; SQ8 and PQ are no dearer)
    "hnsw_ef": 1700.0,  # d: one unit of efSearch
    "flat_row": 5.0,  # one flat row tested
    "flat_score": 100.0,  # d: one passing flat row scored
    "translate": 2.0,  # one id-map entry looked up (PQ plans: selector over positions)
}
# A bitmap selector costs (max id) / 8 bytes; past 64 bits an id a hash set is smaller.
BITMAP_BITS_PER_ID = 64


# --------------------------------------------------------------------------------------------
# The passing rows
# --------------------------------------------------------------------------------------------


class Allowed:
    """The ids a filter passes, prepared for search: distinct ids, a bitmap, a faiss selector.

    Each view is computed once, when first asked for; negative ids (faiss' "missing") are
    dropped. Build it with `from_ids` (int64 ids, any order, duplicates allowed) or
    `from_mask` (a bool per id: `mask[i]` says whether id i passes).
    """

    def __init__(self, ids: np.ndarray | None = None, mask: np.ndarray | None = None):
        if (ids is None) == (mask is None):
            raise ValueError("give ids or a mask")
        if mask is not None:
            self._mask = np.ascontiguousarray(mask, dtype=bool)
            self._ids = None
        else:
            raw = np.asarray(ids)
            if raw.ndim != 1 or not (np.issubdtype(raw.dtype, np.integer) or raw.size == 0):
                raise ValueError(f"allowed ids must be a 1-D integer array, not {raw.dtype} "
                                 f"{raw.shape}")
            raw = raw.astype(np.int64, copy=False)
            self._ids = raw[raw >= 0] if raw.size and raw.min() < 0 else raw
            self._mask = None
        self._selector: faiss.IDSelector | None = None
        self._in_lists: tuple[_Lists, _InLists] | None = None

    @classmethod
    def from_ids(cls, ids: np.ndarray) -> Allowed:
        return cls(ids=ids)

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Allowed:
        return cls(mask=mask)

    def __len__(self) -> int:
        return self.count

    @cached_property
    def max_id(self) -> int:
        if self._ids is not None:
            return int(self._ids.max()) if len(self._ids) else -1
        nonzero = np.flatnonzero(self._mask)
        return int(nonzero[-1]) if len(nonzero) else -1

    @property
    def uses_bitmap(self) -> bool:
        return self._mask is not None or (
            self.max_id + 1 <= BITMAP_BITS_PER_ID * len(self._ids) + 4096
        )

    @property
    def _sorts(self) -> bool:
        # few ids (or ids too sparse for a bitmap): sorting them beats a pass over the id range
        return self._ids is not None and (len(self._ids) < 4096 or not self.uses_bitmap)

    @cached_property
    def mask(self) -> np.ndarray:
        """(max id + 1,) bool: which ids pass."""
        if self._mask is not None:
            return self._mask
        mask = np.zeros(self.max_id + 1, dtype=bool)
        mask[self._ids] = True
        return mask

    @cached_property
    def unique(self) -> np.ndarray:
        """(count,) the distinct passing ids, ascending."""
        if self._sorts:  # (numpy's unique hashes: 10x slower than a sort here)
            ordered = np.sort(self._ids)
            return ordered[np.concatenate([ordered[:1] >= 0, ordered[1:] != ordered[:-1]])]
        return np.flatnonzero(self.mask).astype(np.int64)

    @cached_property
    def count(self) -> int:
        """How many distinct ids pass."""
        if self._sorts:
            return len(self.unique)
        return int(np.count_nonzero(self.mask))

    @cached_property
    def bitmap(self) -> np.ndarray:
        """The mask packed 8 ids a byte, little-endian bits: faiss' IDSelectorBitmap layout."""
        return np.packbits(self.mask, bitorder="little")

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) bool: which of `ids` pass."""
        if not self.uses_bitmap:
            return np.isin(ids, self.unique)
        mask = self.mask
        inside = (ids >= 0) & (ids < len(mask))
        found = np.zeros(len(ids), dtype=bool)
        found[inside] = mask[ids[inside]]
        return found

    def prepare(self, index: faiss.Index) -> Allowed:
        """Compute now what searches of `index` under this filter will need (the selector,
        the count and, for an IVF index, where the passing rows sit in its lists), so that
        the first query doesn't pay for it; returns self."""
        layout = _layout(index)
        _ = self.count
        self.selector()
        if layout.kind == "ivf" and layout.id_map is None:
            lists = _lists(index, layout.ivf)
            if lists is not None:
                self.in_lists(lists)
        return self

    def in_lists(self, lists: _Lists) -> _InLists:
        """Where the passing rows sit in an IVF index's lists: one pass over the ids, kept
        for the next query of this filter."""
        cached = self._in_lists
        if cached is not None and cached[0] is lists:
            return cached[1]
        ids = self.unique  # distinct: the counts also say whether every row passes
        of_id = lists.of_id
        found = of_id[ids[ids < len(of_id)]]
        counts = np.bincount(found[found >= 0], minlength=len(lists.sizes))
        share = min(1.0, counts.sum() / max(1, lists.sizes.sum()))
        even = float((1 - (1 - share) ** lists.sizes).sum())  # lists reached, on average
        holding = np.flatnonzero(counts)
        spread = min(1.0, len(holding) / even) if even > 0 else 1.0
        quantizer = None
        if lists.centroids is not None and len(holding) <= SUB_QUANTIZER_SHARE * len(counts):
            # faiss, not numpy: one query stays on one thread (numpy's BLAS would spread a
            # (1, D) x (D, L) product over every core and wait for them on a busy machine)
            quantizer = faiss.IndexFlatIP(lists.centroids.shape[1])
            quantizer.add(np.ascontiguousarray(lists.centroids[holding]))
        result = _InLists(counts, spread, holding, quantizer)
        self._in_lists = (lists, result)
        return result

    def selector(self) -> faiss.IDSelector:
        """A faiss selector of these ids (it points into arrays this object keeps alive)."""
        if self._selector is None:
            self._selector = self._new_selector()
        return self._selector

    def _new_selector(self) -> faiss.IDSelector:
        if self.uses_bitmap:
            bitmap = self.bitmap
            sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        else:
            unique = self.unique
            sel = faiss.IDSelectorBatch(len(unique), faiss.swig_ptr(unique))
        sel.owner = self  # faiss holds a raw pointer into our arrays
        return sel


def _as_allowed(allowed: np.ndarray | Allowed) -> Allowed:
    return allowed if isinstance(allowed, Allowed) else Allowed.from_ids(allowed)


# --------------------------------------------------------------------------------------------
# The index: what it is, what it holds
# --------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    kind: str  # flat | hnsw | ivf | refine
    inner: faiss.Index  # under the id map, if any
    outer: faiss.Index | None  # the IDMap / IDMap2 around it
    reverse: bool  # IDMap2: reconstruct by id
    ivf: faiss.IndexIVF | None = None
    nlist: int = 0
    nprobe: int = 0
    ef: int = 0
    id_map: np.ndarray | None = None  # position -> id (a view), when an id map wraps it


# The structure of an index (what wraps what), per index object: reading it is ~20 us of
# SWIG calls, a tenth of a query. Its parameters (nprobe, efSearch, the id map) are read
# afresh on every call, as the caller may change them.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout(index: faiss.Index) -> _Layout:
    try:
        layout = _LAYOUTS.get(index)
    except TypeError:  # an index object that can't be weakly referenced
        layout = None
    if layout is None:
        layout = _read_layout(index)
        try:
            _LAYOUTS[index] = layout
        except TypeError:
            pass
    fresh = {}  # into a copy: searches from several threads share the cached one
    if layout.outer is not None:
        size = layout.outer.id_map.size()
        fresh["id_map"] = (faiss.rev_swig_ptr(layout.outer.id_map.data(), size) if size
                           else np.zeros(0, np.int64))
    if layout.ivf is not None:
        fresh["nprobe"] = int(layout.ivf.nprobe)
    elif layout.kind == "hnsw":
        fresh["ef"] = int(layout.inner.hnsw.efSearch)
    return replace(layout, **fresh)


def _read_layout(index: faiss.Index) -> _Layout:
    outer = faiss.downcast_index(index)
    reverse, inner = False, outer
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(outer.index)
        reverse = isinstance(outer, faiss.IndexIDMap2)
    else:
        outer = None
    if hasattr(inner, "hnsw"):
        return _Layout("hnsw", inner, outer, reverse)
    if isinstance(inner, faiss.IndexRefine):
        ivf = faiss.extract_index_ivf(inner.base_index)
        return _Layout("refine", inner, outer, reverse, ivf, ivf.nlist)
    if isinstance(inner, faiss.IndexFlat):
        return _Layout("flat", inner, outer, reverse)
    try:
        ivf = faiss.extract_index_ivf(inner)
    except RuntimeError:
        raise ValueError(f"filtered search can't handle {type(inner).__name__}") from None
    return _Layout("ivf", inner, outer, reverse, ivf, ivf.nlist)


def _exact_storage(layout: _Layout) -> faiss.Index | None:
    """The index (by position) that holds float32 vectors, when this one has them."""
    if layout.kind == "flat":
        return layout.inner
    if layout.kind == "hnsw" and isinstance(layout.inner, faiss.IndexHNSWFlat):
        return layout.inner
    if layout.kind == "refine":
        refine = faiss.downcast_index(layout.inner.refine_index)
        return refine if isinstance(refine, faiss.IndexFlat) else None
    return None


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass
class FilterPlan:
    route: str  # exact | ann
    n_passing: int
    selectivity: float
    params: dict[str, int] = field(default_factory=dict)  # ann: the starting nprobe / efSearch
    exact_ms: float = 0.0  # estimated
    ann_ms: float = 0.0  # estimated
    reason: str = ""


def _widened(tuned: int, selectivity: float, ceiling: int, kind: str) -> int:
    widened = tuned * max(selectivity, 1e-9) ** -WIDEN_EXPONENT[kind]
    return int(min(ceiling, max(tuned, math.ceil(widened))))


def plan_filtered(
    index: faiss.Index, n_passing: int, k: int = 10, *, has_vectors_of: bool = False
) -> FilterPlan:
    """The cheaper route for a filter passing `n_passing` of the index's rows (module notes).

    `has_vectors_of`: whether the caller can supply the passing rows' float32 vectors; an
    IVF index over fp16 / 8-bit codes holds none, and is then searched by its own route
    (widened to all its lists at worst)."""
    layout = _layout(index)
    source = _exact_source(layout, has_vectors_of)
    return _plan(layout, int(index.ntotal), index.d, n_passing, k, source)


def _plan(
    layout: _Layout,
    ntotal: int,
    dim: int,
    m: int,
    k: int,
    source: str | None,
    where: _InLists | None = None,
) -> FilterPlan:
    """The cheaper route by the cost model of the module notes; `where` (an IVF index's
    lists holding the passing rows) refines the IVF estimate beyond an evenly spread filter."""
    s = min(1.0, m / max(ntotal, 1))
    d = dim / 512
    translate = COSTS["translate"] * ntotal  # finding positions in an id map
    exact_ns = (COSTS["exact_fixed"] + COSTS["exact_row"] * d * m
                + (translate if source == "position" else 0.0))
    params: dict[str, int] = {}
    if layout.kind == "flat":
        ann_ns = COSTS["flat_row"] * ntotal + COSTS["flat_score"] * d * m
    elif layout.kind == "hnsw":
        ef = _widened(max(layout.ef, k), s, HNSW_EF_CAP, "hnsw")
        params = {"efSearch": ef}
        ann_ns = COSTS["ann_fixed"] + COSTS["hnsw_ef"] * d * ef
    else:
        nlist = max(layout.nlist, 1)
        nprobe = _widened(max(layout.nprobe, 1), s, nlist, layout.kind)
        params = {"nprobe": nprobe}
        probed, centroids, passing = nprobe, nlist, s * nprobe * ntotal / nlist
        if where is not None and len(where.holding):
            holding = len(where.holding)
            probed = min(holding, nprobe * min(SPREAD_MAX, 1.0 / max(where.spread, 1e-9)))
            centroids = holding if where.quantizer is not None else nlist
            passing = where.counts.sum() * probed / holding
        ann_ns = (COSTS["ann_fixed"] + COSTS["centroid"] * d * centroids
                  + COSTS["ivf_list"] * probed + COSTS["selector"] * probed * ntotal / nlist
                  + COSTS["ivf_code"] * d * passing)
        if layout.kind == "refine" and layout.id_map is not None:
            ann_ns += translate  # the selector over the IVF lists' positions
    plan = FilterPlan("ann", m, s, params, round(exact_ns / 1e6, 4), round(ann_ns / 1e6, 4))
    if source is not None and exact_ns <= ann_ns:
        plan.route, plan.reason = "exact", f"scoring the {m} passing rows is cheaper"
    elif source is None:
        plan.reason = "the index holds no float32 vectors (and no vectors_of): its own search"
    else:
        plan.reason = "the index's search with a selector is cheaper"
    return plan


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


def _empty(n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n_queries, 0), np.float32), np.zeros((n_queries, 0), np.int64)


def _trim(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the trailing columns no query filled (ids the index doesn't hold)."""
    filled = (ids >= 0).any(axis=0)
    width = int(filled.nonzero()[0][-1]) + 1 if filled.any() else 0
    return scores[:, :width], ids[:, :width]


def _positions(layout: _Layout, allowed: Allowed) -> np.ndarray:
    """Positions (in the index under the id map) of the passing rows it holds: O(ntotal)."""
    if layout.id_map is None:
        unique = allowed.unique
        return unique[unique < layout.inner.ntotal]
    return np.flatnonzero(allowed.contains(layout.id_map)).astype(np.int64)


def _exact_source(layout: _Layout, has_vectors_of: bool) -> str | None:
    """Where the exact route reads the passing rows' float32 vectors: "id" (the index, by id
    through IDMap2's reverse map: O(passing)), "position" (the index, after finding the
    rows' positions in its id map: O(ntotal)), "vectors_of" (the caller), or None."""
    storage = _exact_storage(layout)
    if storage is not None and (layout.reverse or layout.id_map is None):
        return "id"
    if has_vectors_of:
        return "vectors_of"
    return "position" if storage is not None else None


def _passing_vectors(
    index: faiss.Index, layout: _Layout, allowed: Allowed, vectors_of: VectorsOf | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, float32 vectors (n, D)) of the passing rows, or None when none can be had."""
    source = _exact_source(layout, vectors_of is not None)
    if source is None:
        return None
    storage = _exact_storage(layout)
    if source == "id" and layout.id_map is not None:
        ids = allowed.unique
        try:
            return ids, index.reconstruct_batch(ids)
        except RuntimeError:  # an id the index doesn't hold: find the others by position
            source = "position"
    if source in ("id", "position"):
        positions = _positions(layout, allowed)
        ids = layout.id_map[positions] if layout.id_map is not None else positions
        return ids.astype(np.int64), storage.reconstruct_batch(positions)
    ids = allowed.unique
    vectors = _checked_vectors(vectors_of, ids, index.d)
    known = ~np.isnan(vectors).any(axis=1)  # a NaN row: an id the store holds no vector for
    return ids[known], vectors[known]


def _unsteerable(
    queries: np.ndarray, k: int, allowed: Allowed, vectors_of: VectorsOf, index: faiss.Index
) -> tuple[np.ndarray, np.ndarray]:
    ids = allowed.unique
    vectors = _checked_vectors(vectors_of, ids, index.d)
    known = ~np.isnan(vectors).any(axis=1)
    return _trim(*_exact(queries, min(int(k), int(known.sum())), ids[known], vectors[known]))


def _checked_vectors(vectors_of: VectorsOf, ids: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.asarray(vectors_of(ids), dtype=np.float32)
    if vectors.shape != (len(ids), dim):
        raise ValueError(f"vectors_of gave an array of {vectors.shape} for {len(ids)} ids, "
                         f"expected ({len(ids)}, {dim})")
    return vectors


def _exact(
    queries: np.ndarray, k: int, ids: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(ids))
    if k == 0:
        return _empty(len(queries))
    scores, positions = faiss.knn(queries, np.ascontiguousarray(vectors, np.float32), k,
                                  metric=faiss.METRIC_INNER_PRODUCT)
    return scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)


def _search_params(
    index: faiss.Index, layout: _Layout, sel: faiss.IDSelector, value: int
) -> faiss.SearchParameters:
    if layout.kind == "flat":
        params = faiss.SearchParameters(sel=sel)
    elif layout.kind == "hnsw":
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=value)
    elif layout.kind == "ivf":
        params = faiss.SearchParametersIVF(sel=sel, nprobe=value)
    else:
        # IndexRefine passes only its nested parameters on, so the selector must be there,
        # over the positions the IVF lists hold (IDMap translates a top-level one only).
        ivf = faiss.SearchParametersIVF(sel=sel, nprobe=value)
        params = faiss.IndexRefineSearchParameters(k_factor=layout.inner.k_factor,
                                                   base_index_params=ivf)
        params.ivf_ref = ivf  # the wrapper holds a raw pointer
    params.sel_ref = sel  # so does every SearchParameters
    return params


def _ann(
    index: faiss.Index,
    layout: _Layout,
    queries: np.ndarray,
    k: int,
    sel: faiss.IDSelector,
    start: int,
    needed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(scores, ids, rows still short, widest value used): the index's search with a
    selector, repeated wider for the queries that found fewer than `needed` passing rows."""
    ceiling = {"flat": 0, "hnsw": HNSW_EF_CAP}.get(layout.kind, layout.nlist)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    pending, value = np.arange(len(queries)), start
    while True:
        found_scores, found_ids = index.search(
            queries[pending], k, params=_search_params(index, layout, sel, value))
        scores[pending], ids[pending] = found_scores, found_ids
        pending = pending[(found_ids[:, :needed] < 0).any(axis=1)]
        # flat: every passing row was scored; IVF: all lists probed, every passing row seen
        if not len(pending) or value >= ceiling:
            return scores, ids, pending, value
        value = min(ceiling, max(value + 1, value * WIDEN_STEP))


@dataclass
class _Lists:
    """Where an IVF index keeps its rows: the list of each id and the size of each list."""

    of_id: np.ndarray  # (max id + 1,) int32, -1 for ids it doesn't hold
    sizes: np.ndarray  # (nlist,)
    centroids: np.ndarray | None  # (nlist, D) of an inner-product flat quantizer (a view)


@dataclass
class _InLists:
    """Where a filter's passing rows sit in an IVF index's lists."""

    counts: np.ndarray  # (nlist,) passing rows in each list
    # the lists holding passing rows over those a filter of this size spread evenly would
    # reach: ~1 for a random sample of the rows, ~0.05 for rows gathered in a few lists
    spread: float
    holding: np.ndarray  # (L,) the lists holding passing rows
    quantizer: faiss.IndexFlatIP | None  # their L centroids, when they are few


# Per index object, built once (~0.1 s at 1M rows): it turns a filter into the number of
# passing rows each list holds (`Allowed.in_lists`).
_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lists(index: faiss.Index, ivf: faiss.IndexIVF) -> _Lists | None:
    """The lists of an IVF index, or None when its ids are too sparse for an array by id."""
    try:
        cached = _LISTS.get(index)
    except TypeError:  # an index object that can't be weakly referenced
        return None
    if cached is not None and cached[0] == (ivf.ntotal, ivf.nlist):
        return cached[1]
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], np.int64)
    ids = np.empty(int(sizes.sum()), np.int64)
    start = 0
    for i in np.flatnonzero(sizes).tolist():
        size = int(sizes[i])
        pointer = invlists.get_ids(i)
        ids[start:start + size] = faiss.rev_swig_ptr(pointer, size)
        invlists.release_ids(i, pointer)
        start += size
    lists = None
    if ids.size and ids.min() >= 0 and ids.max() < 4 * ids.size + 4096:
        of_id = np.full(int(ids.max()) + 1, -1, np.int32)
        of_id[ids] = np.repeat(np.arange(ivf.nlist, dtype=np.int32), sizes)
        quantizer = faiss.downcast_index(ivf.quantizer)
        centroids = None
        if (isinstance(quantizer, faiss.IndexFlat)
                and quantizer.metric_type == faiss.METRIC_INNER_PRODUCT):
            centroids = faiss.rev_swig_ptr(quantizer.get_xb(), ivf.nlist * ivf.d).reshape(
                ivf.nlist, ivf.d)
        lists = _Lists(of_id, sizes, centroids)
    _LISTS[index] = ((ivf.ntotal, ivf.nlist), lists)
    return lists


def _ivf_by_lists(
    layout: _Layout,
    queries: np.ndarray,
    k: int,
    sel: faiss.IDSelector,
    where: _InLists,
    planned: int,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(scores, ids, most lists probed, rows the index holds): IVF search that probes, per
    query and in the quantizer's order, only lists holding passing rows, until it has
    probed `planned` of them (x 1/spread, <= SPREAD_MAX, for a filter gathered in few lists,
    which then also scans as many passing rows as `planned` lists hold under an even one),
    and at least min(k, passing) rows: a filter whose rows gather in a few lists far from
    the query is probed as deep as it takes, and lists without a passing row are never
    scanned. When those lists are few, only their centroids are scored."""
    counts, spread = where.counts, where.spread
    ivf = layout.ivf
    held = int(counts.sum())
    needed = min(k, held)
    deeper = min(SPREAD_MAX, 1.0 / max(spread, 1e-9))
    lists_needed = planned * deeper
    # a filter gathered in few lists: also as many passing rows as `planned` lists of an even
    # one hold (its lists are partly passing, their passing rows on the far side); an even
    # one probes `planned` lists, as the unfiltered search does at s = 1
    rows_needed = needed if spread >= EVEN_SPREAD else max(needed,
                                                          lists_needed * held / ivf.nlist)
    if where.quantizer is not None:
        # few lists hold passing rows: order those alone (the others are never probed)
        width = len(where.holding)
        centroid_scores, by_score = where.quantizer.search(queries, width)  # (Q, L)
        order = where.holding[by_score]
        in_list = counts[order]
        enough = ((np.cumsum(in_list > 0, axis=1) >= lists_needed)
                  & (np.cumsum(in_list, axis=1) >= rows_needed))
    else:
        # Order the lists a few times deeper than needed on average (a heap of nlist costs
        # as much as the centroid scores), all of them if some query needs more.
        width = min(ivf.nlist, math.ceil(2 * lists_needed / max(spread, 1e-9)))
        while True:
            centroid_scores, order = ivf.quantizer.search(queries, width)
            in_list = counts[order]  # order >= 0: width <= nlist
            enough = ((np.cumsum(in_list > 0, axis=1) >= lists_needed)
                      & (np.cumsum(in_list, axis=1) >= rows_needed))
            if width == ivf.nlist or enough[:, -1].all():
                break
            width = ivf.nlist  # some query needs lists further out: order them all
    nprobe = np.where(enough.any(axis=1), enough.argmax(axis=1) + 1, width)
    nprobe = np.maximum(nprobe, min(layout.nprobe, width))
    widest = int(nprobe.max())
    assign = np.ascontiguousarray(order[:, :widest])
    # faiss skips list -1: past each query's depth, and lists no passing row is in
    assign[(np.arange(widest)[None, :] >= nprobe[:, None]) | (in_list[:, :widest] == 0)] = -1
    centroid_scores = np.ascontiguousarray(centroid_scores[:, :widest])
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    # one per call: the server searches from several threads, and nprobe is the stride of
    # `assign` for this call alone
    params = faiss.SearchParametersIVF(sel=sel, nprobe=widest)
    params.sel_ref = sel
    # the C++ call: faiss' Python wrapper of search_preassigned refuses search parameters
    ivf.search_preassigned_c(len(queries), faiss.swig_ptr(queries), k, faiss.swig_ptr(assign),
                             faiss.swig_ptr(centroid_scores), faiss.swig_ptr(scores),
                             faiss.swig_ptr(ids), False, params)
    return scores, ids, int((assign >= 0).sum(axis=1).max()), needed


def filtered_search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | Allowed,
    *,
    vectors_of: VectorsOf | None = None,
    route: str = "auto",
) -> tuple[np.ndarray, np.ndarray, FilterPlan]:
    """`search_filtered`, and the plan it followed (route, estimated costs, widest nprobe /
    efSearch used in `params`). `route` forces "exact" or "ann" (for measuring them)."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}: use one of {', '.join(ROUTES)}")
    queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
    allowed = _as_allowed(allowed)
    try:
        layout = _layout(index)
    except ValueError:
        if vectors_of is None:
            raise
        # an index this module can't steer (a GPU index, another faiss type): the rows
        return (*_unsteerable(queries, k, allowed, vectors_of, index), FilterPlan(
            "exact", allowed.count, allowed.count / max(int(index.ntotal), 1),
            reason=f"{type(index).__name__} takes no selector here: the passing rows scored"))
    source = _exact_source(layout, vectors_of is not None)
    m = allowed.count
    k = min(int(k), m, int(index.ntotal))
    lists = where = None
    if k > 0 and layout.kind == "ivf" and layout.id_map is None:
        lists = _lists(index, layout.ivf)
        where = allowed.in_lists(lists) if lists is not None else None
    plan = _plan(layout, int(index.ntotal), index.d, m, k, source, where)
    if k <= 0:
        plan.reason = "nothing passes" if m == 0 or index.ntotal == 0 else "k = 0"
        return (*_empty(len(queries)), plan)
    if route == "exact" or (route == "auto" and plan.route == "exact"):
        found = _passing_vectors(index, layout, allowed, vectors_of)
        if found is None:
            raise ValueError("the exact route needs vectors: this index holds none "
                             "(give vectors_of)")
        plan.route = "exact"
        return (*_trim(*_exact(queries, k, *found)), plan)
    plan.route = "ann"
    name = next(iter(plan.params), None)
    planned = plan.params.get(name, 0)
    if layout.kind == "refine" and layout.id_map is not None:
        # over the positions the IVF lists hold (module notes): O(ntotal)
        sel = Allowed.from_mask(allowed.contains(layout.id_map)).selector()
    else:
        sel = allowed.selector()
    if where is not None and where.counts.sum() == index.ntotal:
        plan.params[name] = layout.nprobe  # every row passes: the unfiltered search
        plan.reason = "every row of the index passes: its unfiltered search"
        return (*search_index(index, queries, k), plan)
    if where is not None and (where.spread < EVEN_SPREAD
                              or len(where.holding) < EVEN_SPREAD * layout.nlist):
        # some lists hold no passing row: order and probe only those that do
        scores, ids, value, needed = _ivf_by_lists(layout, queries, k, sel, where, planned)
        short = np.flatnonzero((ids[:, :needed] < 0).any(axis=1))
        if len(short):  # the index changed since the lists were read: widen as below
            found = _ann(index, layout, queries[short], k, sel, value, needed)
            scores[short], ids[short], value = found[0], found[1], max(value, found[3])
            short = short[found[2]]
    else:  # passing rows in (nearly) every list: the index's own search, widened
        needed = k if where is None else min(k, int(where.counts.sum()))
        scores, ids, short, value = _ann(index, layout, queries, k, sel, planned, needed)
    if name:
        plan.params[name] = value
    if len(short) and layout.kind == "hnsw":
        # the graph gave up before k passing rows: score them all, if they can be had
        found = _passing_vectors(index, layout, allowed, vectors_of)
        if found is not None:
            scores[short], ids[short] = _exact(queries[short], k, *found)
            plan.reason += f"; {len(short)} of {len(queries)} queries fell back to exact"
    return (*_trim(scores, ids), plan)


def search_filtered(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | Allowed | None,
    *,
    vectors_of: VectorsOf | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) among the rows `allowed` passes, each (Q, k'), best first.

    queries: (Q, D) float32 (a (D,) vector is one query). allowed: int64 ids (any order;
    duplicates, negatives and ids the index doesn't hold are ignored), or an `Allowed`
    prepared from them; None searches unfiltered (`search_index`). vectors_of(ids (n,)) ->
    (n, D) float32: the store rows' embeddings, for indexes that hold no float32 vectors (IVF
    over fp16 / 8-bit codes); a row of NaN marks an id it has no vector for.

    k' = min(k, passing rows); scores are inner products (cosine over unit vectors) as
    `search_index` gives them. A slot no passing row fills (an id the index doesn't hold)
    has id -1 and score -inf.
    """
    if allowed is None:
        return search_index(index, queries, k)
    scores, ids, _plan_used = filtered_search(index, queries, k, allowed,
                                              vectors_of=vectors_of)
    return scores, ids
