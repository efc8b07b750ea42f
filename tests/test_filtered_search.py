"""Filtered search (vqret.retrieval.filtered_search): the top-k among a filter's passing rows,
against brute force over those rows, through every index vqret builds. CPU, small sizes, no
timing: the routes are checked by what they return, never by how fast."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from vqret.benchmarks.ann_data import Mixture
from vqret.retrieval import ann, filtered_search
from vqret.retrieval.filtered_search import (
    Allowed,
    plan_filtered,
    search_filtered,
)
from vqret.retrieval.index import build_index, search_index

DIM = 64
N = 4000
K = 10
KINDS = ("flat", "hnsw", "ivf", "ivfpq")
SELECTIVITIES = (0.001, 0.005, 0.02, 0.1, 0.5, 1.0)


@pytest.fixture(scope="module")
def data():
    """(ids, vectors, queries): 4000 CLIP-like vectors under ids that are not positions."""
    mixture = Mixture.make(DIM, components=64, groups=8, seed=3)
    vectors = mixture.draw(N, np.random.default_rng(1))
    ids = np.arange(N, dtype=np.int64) * 3 + 11
    return ids, vectors, mixture.draw(40, np.random.default_rng(2))


@pytest.fixture(scope="module")
def indexes(data):
    """Each index type as vqret builds it (IDMap2 Flat, IDMap2 HNSW32, IVF SQfp16, IDMap
    IVF-PQ + RFlat re-ranking), tuned as `vqret index` tunes it."""
    ids, vectors, _ = data
    built = {"flat": build_index(ids, vectors)}
    for kind in KINDS[1:]:
        plan = ann.plan_index(N, DIM, kind)
        index = ann.build_index(plan, ids, vectors)
        ann.tune(index, plan, vectors, ids)
        built[kind] = index
    assert ann.refine_of(built["ivfpq"]) is not None  # the re-ranked PQ plan
    return built


def store_vectors(data):
    """vectors_of as the store would answer it: by id, NaN for an id it has no row for."""
    ids, vectors, _ = data
    where = {int(i): p for p, i in enumerate(ids)}

    def vectors_of(wanted: np.ndarray) -> np.ndarray:
        out = np.full((len(wanted), DIM), np.nan, np.float32)
        for row, i in enumerate(wanted.tolist()):
            if i in where:
                out[row] = vectors[where[i]]
        return out

    return vectors_of


def brute_force(data, passing: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Exact filtered top-k: every passing row scored."""
    ids, vectors, queries = data
    held = passing[np.isin(passing, ids)]
    positions = np.searchsorted(ids, held)
    k = min(k, len(held))
    scores, found = faiss.knn(queries, vectors[positions], k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores, held[found]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return ann.recall_vs_exact(found, truth)


def draw_passing(data, selectivity: float, seed: int = 0) -> np.ndarray:
    ids = data[0]
    m = max(1, round(selectivity * len(ids)))
    return np.random.default_rng(seed).choice(ids, m, replace=False)


# --------------------------------------------------------------------------------------------
# Exact index: the exact filtered top-k, by either route
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["auto", "exact", "ann"])
@pytest.mark.parametrize("selectivity", SELECTIVITIES)
def test_flat_gives_the_exact_filtered_top_k(data, indexes, route, selectivity):
    passing = draw_passing(data, selectivity)
    scores, found, plan = filtered_search.filtered_search(
        indexes["flat"], data[2], K, passing, route=route)
    truth_scores, truth = brute_force(data, passing)
    assert found.shape == truth.shape == (len(data[2]), min(K, len(passing)))
    np.testing.assert_array_equal(found, truth)
    np.testing.assert_allclose(scores, truth_scores, rtol=1e-5, atol=1e-5)
    assert plan.route in ("exact", "ann") and (route == "auto" or plan.route == route)


def test_flat_scores_match_the_unfiltered_search(data, indexes):
    """A filter passing every row changes nothing: same ids, same scores as search_index."""
    ids, _, queries = data
    scores, found = search_filtered(indexes["flat"], queries, K, ids)
    plain_scores, plain = search_index(indexes["flat"], queries, K)
    np.testing.assert_array_equal(found, plain)
    np.testing.assert_allclose(scores, plain_scores, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# ANN indexes: min(k, passing) results, all passing, close to exact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("selectivity", SELECTIVITIES)
def test_ann_indexes_return_k_passing_rows_close_to_exact(data, indexes, kind, selectivity):
    passing = draw_passing(data, selectivity, seed=1)
    truth_scores, truth = brute_force(data, passing)
    for route in ("auto", "ann"):  # the forced ANN route: the selector through every wrapper
        scores, found, plan = filtered_search.filtered_search(
            indexes[kind], data[2], K, passing, vectors_of=store_vectors(data), route=route)
        assert found.shape == (len(data[2]), min(K, len(passing))), (route, plan)
        assert np.isin(found, passing).all(), (route, plan)
        assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
        assert recall(found, truth) >= (0.99 if plan.route == "exact" else 0.9), (route, plan)
        if plan.route == "exact":
            np.testing.assert_allclose(scores, truth_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS[1:])
def test_without_vectors_each_index_still_finds_k(data, indexes, kind):
    """No vectors_of: IVF over fp16 codes can only search itself, widened to all lists; HNSW
    and the re-ranked PQ plan score their own float32 vectors."""
    passing = draw_passing(data, 0.002, seed=2)  # 8 rows: fewer than k
    scores, found, plan = filtered_search.filtered_search(indexes[kind], data[2], K, passing)
    assert found.shape == (len(data[2]), len(passing))
    assert all(set(row) == set(passing) for row in found)
    if kind == "ivf":  # every list holding one of the 8 rows probed, no other
        assert plan.route == "ann" and plan.params["nprobe"] <= len(passing)
    else:
        assert plan.route == "exact"


def test_the_pq_plan_filters_behind_its_re_ranking_stage(data, indexes):
    """IDMap -> IndexRefine -> IVF-PQ: faiss translates a selector for the IDMap's own search
    but IndexRefine passes on only its nested IVF parameters, so a selector of ids would
    filter positions. The results must be ids that pass, never positions that happen to."""
    ids = data[0]
    passing = ids[::7]
    _, found, plan = filtered_search.filtered_search(indexes["ivfpq"], data[2], K, passing,
                                                     route="ann")
    assert np.isin(found, passing).all()
    assert recall(found, brute_force(data, passing)[1]) >= 0.9


def test_ivf_widens_nprobe_until_k_passing_rows(data, indexes):
    """nprobe 1 and a 0.5% filter: the first probe finds almost nothing that passes."""
    index = faiss.clone_index(indexes["ivf"])
    faiss.extract_index_ivf(index).nprobe = 1
    passing = draw_passing(data, 0.005, seed=3)  # 20 rows
    _, found, plan = filtered_search.filtered_search(index, data[2], K, passing, route="ann")
    assert found.shape == (len(data[2]), K) and (found >= 0).all()
    assert plan.params["nprobe"] > 1


def test_hnsw_falls_back_to_exact_when_its_beam_gives_up(data, indexes, monkeypatch):
    monkeypatch.setattr(filtered_search, "HNSW_EF_CAP", 16)
    monkeypatch.setitem(filtered_search.WIDEN_EXPONENT, "hnsw", 0.0)  # no widening up front
    passing = draw_passing(data, 0.003, seed=4)  # 12 rows: a 16-wide beam misses most
    scores, found, plan = filtered_search.filtered_search(indexes["hnsw"], data[2], K, passing,
                                                          route="ann")
    truth_scores, truth = brute_force(data, passing)
    assert "fell back to exact" in plan.reason
    assert found.shape == truth.shape and np.isin(found, passing).all()
    assert recall(found, truth) >= 0.99


# --------------------------------------------------------------------------------------------
# Edges: nothing passes, fewer than k, ids the index doesn't hold
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_filter_passing_nothing_gives_an_empty_result(data, indexes, kind):
    for allowed in (np.zeros(0, np.int64), np.array([-1, 5, 10**12]), Allowed.from_ids([])):
        scores, found = search_filtered(indexes[kind], data[2], K, allowed,
                                        vectors_of=store_vectors(data))
        assert scores.shape == found.shape == (len(data[2]), 0)
        assert scores.dtype == np.float32 and found.dtype == np.int64


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_passing_than_k_gives_all_of_them_best_first(data, indexes, kind):
    passing = data[0][[3, 100, 2500, 3999]]
    for route in ("auto", "ann"):
        scores, found, _ = filtered_search.filtered_search(
            indexes[kind], data[2], K, passing, vectors_of=store_vectors(data), route=route)
        truth = brute_force(data, passing)[1]
        assert found.shape == (len(data[2]), 4)
        assert all(set(row) == set(passing) for row in found)
        if kind == "flat" or route == "auto":
            np.testing.assert_array_equal(found, truth)


@pytest.mark.parametrize("kind", KINDS)
def test_ids_the_index_does_not_hold_are_ignored(data, indexes, kind):
    """Unknown ids (between the index's, far above, negative) and duplicates change nothing."""
    ids = data[0]
    held = ids[::40]  # 100 rows
    noise = np.concatenate([held + 1, [10**9, 2**40, -1, -7], held[:20]])
    allowed = np.random.default_rng(5).permutation(np.concatenate([held, noise]))
    for route in ("auto", "exact", "ann"):
        if kind == "ivf" and route == "exact":
            continue  # needs vectors_of, tested below
        _, found, _ = filtered_search.filtered_search(indexes[kind], data[2], K, allowed,
                                                      route=route)
        assert found.shape == (len(data[2]), K) and np.isin(found, held).all(), route
    _, found = search_filtered(indexes[kind], data[2], K, allowed,
                               vectors_of=store_vectors(data))
    truth = brute_force(data, held)[1]
    assert np.isin(found, held).all() and recall(found, truth) >= 0.9


def test_fewer_held_than_k_trims_to_those_held(data, indexes):
    ids = data[0]
    allowed = np.array([ids[5], ids[6], ids[6] + 1, 10**9])
    for kind in KINDS:
        _, found = search_filtered(indexes[kind], data[2], K, allowed,
                                   vectors_of=store_vectors(data))
        assert found.shape == (len(data[2]), 2), kind
        assert all(set(row) == {ids[5], ids[6]} for row in found)


def test_sparse_ids_use_a_hash_set_selector(data, indexes):
    """Ids spread over 2^40 would need a 128 GB bitmap: faiss' IDSelectorBatch instead."""
    ids = data[0]
    passing = ids[::50]
    allowed = Allowed.from_ids(np.concatenate([passing, [2**40]]))
    assert not allowed.uses_bitmap
    assert isinstance(allowed.selector(), faiss.IDSelectorBatch)
    _, found, _ = filtered_search.filtered_search(indexes["ivf"], data[2], K, allowed,
                                                  route="ann")
    assert np.isin(found, passing).all() and found.shape[1] == K


# --------------------------------------------------------------------------------------------
# The prepared filter, the planner, the arguments
# --------------------------------------------------------------------------------------------


def test_prepared_and_raw_ids_give_the_same_results(data, indexes):
    passing = draw_passing(data, 0.2, seed=6)
    mask = np.zeros(passing.max() + 1, bool)
    mask[passing] = True
    for kind in KINDS:
        raw = search_filtered(indexes[kind], data[2], K, passing)
        for allowed in (Allowed.from_ids(passing), Allowed.from_mask(mask)):
            prepared = search_filtered(indexes[kind], data[2], K, allowed)
            np.testing.assert_array_equal(raw[1], prepared[1])


def test_allowed_counts_distinct_non_negative_ids():
    allowed = Allowed.from_ids(np.array([5, 3, 5, -1, 3, 200_000], np.int64))
    assert allowed.count == 3
    np.testing.assert_array_equal(allowed.unique, [3, 5, 200_000])
    np.testing.assert_array_equal(allowed.contains(np.array([3, 4, -1, 200_000, 10**12])),
                                  [True, False, False, True, False])
    big = Allowed.from_ids(np.repeat(np.arange(100_000), 2))  # the bitmap path
    assert big.uses_bitmap and big.count == 100_000
    assert len(big.bitmap) == 100_000 // 8
    with pytest.raises(ValueError, match="integer"):
        Allowed.from_ids(np.array([0.5, 1.5]))


def test_the_planner_scores_small_filters_exactly_and_searches_broad_ones(data, indexes):
    for kind in ("hnsw", "ivf", "ivfpq"):
        small = plan_filtered(indexes[kind], 5, K, has_vectors_of=True)
        broad = plan_filtered(indexes[kind], N, K, has_vectors_of=True)
        assert (small.route, broad.route) == ("exact", "ann"), kind
        assert small.exact_ms < small.ann_ms and broad.exact_ms > broad.ann_ms
    # widening: the fewer rows pass, the more lists are probed
    nprobes = [plan_filtered(indexes["ivf"], round(s * N), K).params["nprobe"]
               for s in SELECTIVITIES]
    assert nprobes == sorted(nprobes, reverse=True)
    assert nprobes[-1] == faiss.extract_index_ivf(indexes["ivf"]).nprobe  # unfiltered: tuned
    # IVF over fp16 codes holds no float32 vectors: without vectors_of, its own search
    assert plan_filtered(indexes["ivf"], 5, K).route == "ann"


def test_arguments(data, indexes):
    ids, _, queries = data
    # None: the unfiltered search
    np.testing.assert_array_equal(search_filtered(indexes["ivf"], queries, K, None)[1],
                                  search_index(indexes["ivf"], queries, K)[1])
    # one (D,) vector is one query
    one = search_filtered(indexes["flat"], queries[0], K, ids[:50])
    assert one[1].shape == (1, K)
    with pytest.raises(ValueError, match="route"):
        filtered_search.filtered_search(indexes["flat"], queries, K, ids, route="fast")
    with pytest.raises(ValueError, match="vectors_of"):
        filtered_search.filtered_search(indexes["ivf"], queries, K, ids[:5], route="exact")
    with pytest.raises(ValueError, match="vectors_of gave"):
        search_filtered(indexes["ivf"], queries, K, ids[:5],
                        vectors_of=lambda wanted: np.zeros((len(wanted), 3), np.float32))
    assert search_filtered(indexes["flat"], queries, 0, ids)[1].shape == (len(queries), 0)
    empty = build_index(np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    assert search_filtered(empty, queries, K, ids)[1].shape == (len(queries), 0)


def test_an_ivf_filter_passing_every_row_is_the_unfiltered_search(data, indexes):
    ids, _, queries = data
    scores, found, plan = filtered_search.filtered_search(indexes["ivf"], queries, K,
                                                          np.concatenate([ids, [10**9]]))
    plain_scores, plain = search_index(indexes["ivf"], queries, K)
    np.testing.assert_array_equal(found, plain)
    assert "unfiltered" in plan.reason
    # one row short of all: the filtered search, which never returns that row
    _, found, plan = filtered_search.filtered_search(indexes["ivf"], queries, K, ids[1:])
    assert "unfiltered" not in plan.reason and not (found == ids[0]).any()


def test_an_index_without_selectors_here_scores_the_passing_rows(data):
    """A faiss type this module can't steer (here plain PQ; on a machine with one, a GPU
    index): with vectors_of, the passing rows are scored exactly; without, a clear error."""
    ids, vectors, queries = data
    pq = faiss.IndexIDMap(faiss.IndexPQ(DIM, 8, 4, faiss.METRIC_INNER_PRODUCT))
    pq.train(vectors)
    pq.add_with_ids(vectors, ids)
    passing = draw_passing(data, 0.1, seed=7)
    scores, found, plan = filtered_search.filtered_search(pq, queries, K, passing,
                                                          vectors_of=store_vectors(data))
    np.testing.assert_array_equal(found, brute_force(data, passing)[1])
    assert plan.route == "exact" and "IndexIDMap" in plan.reason
    with pytest.raises(ValueError, match="can't handle"):
        search_filtered(pq, queries, K, passing)
