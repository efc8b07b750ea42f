"""ANN index choice, recall tuning, in-place updates, recall@k and sizes (vqret.retrieval.ann);
the ANN benchmark's pieces on small data (vqret.benchmarks.ann). CPU, a few seconds."""

from __future__ import annotations

import importlib.util

import faiss
import numpy as np
import pytest
from vqret.benchmarks.ann import (
    BudgetExceeded,
    build_within,
    run_ann_benchmark,
    serialized_bytes,
)
from vqret.benchmarks.ann_data import Mixture, exact_collection
from vqret.retrieval import ann

DIM = 64
MIB = 1 << 20


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """(4000 collection vectors, 200 fresh queries) from a 64-component CLIP-like mixture."""
    mixture = Mixture.make(DIM, components=64, groups=8, seed=3)
    return (mixture.draw(4000, np.random.default_rng(1)),
            mixture.draw(200, np.random.default_rng(2)))


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


# --------------------------------------------------------------------------------------------
# plan_index
# --------------------------------------------------------------------------------------------


def test_auto_is_exact_while_small():
    plan = ann.plan_index(19_999, 512, "auto", memory=1 << 40)
    assert (plan.kind, plan.factory) == ("flat", "IDMap2,Flat")


def test_auto_follows_the_memory_budget():
    n, dim = 1_000_000, 512
    # fp16 vectors (2 bytes a dimension + id) fit: IVF with SQfp16, ~1 KB a vector
    roomy = ann.plan_index(n, dim, "auto", memory=n * (2 * dim + 16))
    assert (roomy.kind, roomy.factory) == ("ivf", "IVF4096,SQfp16")
    assert roomy.bytes_per_vector <= 1.2 * 1024
    # one byte short of that: 8-bit scalar quantization
    tight = ann.plan_index(n, dim, "auto", memory=n * (2 * dim + 16) - 1)
    assert (tight.kind, tight.factory) == ("ivf", "IVF4096,SQ8")
    # less than a byte a dimension: only product quantization fits (64 bytes at d = 512)
    tiny = ann.plan_index(n, dim, "auto", memory=n * (dim + 16) - 1)
    assert (tiny.kind, tiny.factory) == ("ivfpq", "OPQ64,IVF4096,PQ64x8np")
    # 64 B of codes + the IVF list's 8 B id + 8 B in the id map that exact re-ranking needs
    # (its float32 vectors are memory-mapped: outside this budget)
    assert roomy.bytes_per_vector > tight.bytes_per_vector > tiny.bytes_per_vector == 80


def test_without_re_ranking_scalar_codes_come_before_pq():
    """Sharded builds can't re-rank PQ (recall@10 ~0.5-0.65 without): 6- and 4-bit scalar
    codes fill the budgets between 8-bit codes and PQ."""
    n, dim = 100_000_000, 512
    plans = {
        per_vector: ann.plan_index(n, dim, "auto", memory=n * per_vector, refine=False)
        for per_vector in (1040, 1039, 528, 527, 400, 399, 272, 271)
    }
    assert {k: p.factory.split(",")[-1] for k, p in plans.items()} == {
        1040: "SQfp16", 1039: "SQ8", 528: "SQ8", 527: "SQ6", 400: "SQ6", 399: "SQ4",
        272: "SQ4", 271: "PQ64x8np",
    }
    assert [plans[k].bytes_per_vector for k in (527, 399)] == [384 + 8, 256 + 8]
    # with re-ranking the same tight budget still gets re-ranked PQ, as before
    assert ann.plan_index(n, dim, "auto", memory=n * 400).factory.startswith("OPQ64,")
    # and the codes are what faiss makes of the factory
    sq6 = faiss.index_factory(dim, plans[527].factory.replace("IVF32768", "IVF4"))
    assert sq6.code_size == 384


def test_nlist_is_about_four_sqrt_n_with_enough_training_points():
    for n in (20_000, 100_000, 1_000_000, 100_000_000):
        nlist = ann.plan_index(n, 512, "ivf").nlist
        assert nlist & (nlist - 1) == 0  # a power of two
        assert 4 * n**0.5 / 2 <= nlist <= 4 * n**0.5 * 2
        assert n // nlist >= 39  # faiss warns below 39 training points per list
    assert ann.plan_index(1000, 512, "ivf").nlist == 1000 // 39 == 25


def test_asked_types_and_their_fallbacks():
    assert ann.plan_index(50_000, 512, "hnsw").factory == "IDMap2,HNSW32"
    assert ann.plan_index(50_000, 512, "flat").kind == "flat"
    assert ann.plan_index(50_000, 512, "ivf").factory.endswith(",SQfp16")
    assert ann.plan_index(100, 512, "ivf").kind == "flat"  # too few vectors to train
    assert ann.plan_index(5_000, 512, "ivfpq").factory.endswith("x4np")  # too few for 8-bit
    with pytest.raises(ValueError, match="unknown index type"):
        ann.plan_index(10, 512, "lsh")


def test_small_dimensions_plan_every_type():
    for dim in (1, 3, 8, 12, 32):
        for kind in ann.KINDS:
            assert ann.plan_index(20_000, dim, kind, memory=1).factory


# --------------------------------------------------------------------------------------------
# Tuning to a recall target
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_tuned_index_reaches_the_recall_target(clustered, kind):
    vectors, queries = clustered
    plan = ann.plan_index(len(vectors), DIM, kind)
    index = ann.build_index(plan, np.arange(len(vectors)), vectors)
    ann.tune(index, plan, vectors, target=0.95)
    assert plan.recall_at_10 >= 0.95
    assert set(plan.params) == {"nprobe" if kind == "ivf" else "efSearch"}
    # the tuning queries were the collection's own vectors, held out; fresh queries from the
    # same distribution get about the same recall (200 queries: allow sampling noise)
    found = index.search(queries, 10)[1]
    assert ann.recall_vs_exact(found, exact_neighbours(vectors, queries)) >= 0.92


def test_tuning_holds_the_query_out_of_its_own_results(clustered):
    vectors, _ = clustered
    plan = ann.plan_index(len(vectors), DIM, "ivf")
    index = ann.build_index(plan, np.arange(len(vectors)), vectors)
    ann.tune(index, plan, vectors, target=1.01)  # unreachable: stops once recall stops rising
    assert plan.recall_at_10 >= 0.99  # fp16 vectors: probing enough lists is exact search
    assert faiss.extract_index_ivf(index).nprobe == plan.params["nprobe"] <= plan.nlist
    # at nprobe=1 every query finds itself; held out, recall must be what the others give
    ann.set_search_params(index, {"nprobe": 1})
    queries = vectors[:200]
    found = index.search(queries, 11)[1]
    assert (found[:, 0] == np.arange(200)).all()
    honest = ann.recall_vs_exact(found[:, 1:], exact_neighbours(vectors, queries, 11)[:, 1:])
    with_self = ann.recall_vs_exact(found[:, :10], exact_neighbours(vectors, queries))
    assert with_self > honest  # what the old tuning measured, too optimistic


# --------------------------------------------------------------------------------------------
# In-place updates
# --------------------------------------------------------------------------------------------


def test_ivf_updated_in_place_equals_rebuilt(clustered):
    vectors, queries = clustered
    rng = np.random.default_rng(7)
    plan = ann.plan_index(len(vectors), DIM, "ivf")
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 5  # ids are not positions
    trained = ann.build_index(plan, ids[:0], vectors)  # trained, empty

    updated = faiss.clone_index(trained)
    updated.add_with_ids(vectors[:3000], ids[:3000])
    # a run removes 300 rows, replaces 200 (same id, new vector) and adds the last 1000
    removed = rng.choice(ids[:3000], 300, replace=False)
    replaced = np.setdiff1d(ids[:3000], removed)[:200]
    new_vectors = vectors[rng.permutation(len(vectors))[:200]] * np.float32(0.999)
    updated.remove_ids(faiss.IDSelectorBatch(np.concatenate([removed, replaced])))
    updated.add_with_ids(new_vectors, replaced)
    updated.add_with_ids(vectors[3000:], ids[3000:])

    final = {int(i): v for i, v in zip(ids, vectors, strict=True) if i not in set(removed)}
    final.update({int(i): v for i, v in zip(replaced, new_vectors, strict=True)})
    final_ids = np.fromiter(final, np.int64)
    final_vectors = np.stack(list(final.values()))
    rebuilt = faiss.clone_index(trained)
    rebuilt.add_with_ids(final_vectors, final_ids)
    assert updated.ntotal == rebuilt.ntotal == len(final)

    for nprobe in (4, plan.nlist):
        for index in (updated, rebuilt):
            ann.set_search_params(index, {"nprobe": nprobe})
        scores_u, found_u = updated.search(queries, 10)
        scores_r, found_r = rebuilt.search(queries, 10)
        assert [set(r) for r in found_u] == [set(r) for r in found_r]
        np.testing.assert_allclose(scores_u, scores_r, rtol=1e-3, atol=1e-3)
    # all lists probed = exact search over the final rows, up to fp16 rounding at the 10th
    truth = final_ids[exact_neighbours(final_vectors, queries)]
    assert ann.recall_vs_exact(found_u, truth) >= 0.995


# --------------------------------------------------------------------------------------------
# recall_vs_exact and parse_bytes
# --------------------------------------------------------------------------------------------


def test_recall_vs_exact_hand_cases():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert ann.recall_vs_exact(np.array([[3, 2, 1], [6, 5, 4]]), truth) == 1.0  # order is free
    assert ann.recall_vs_exact(np.array([[1, 9, 8], [4, 5, 7]]), truth) == pytest.approx(0.5)
    assert ann.recall_vs_exact(np.array([[1, -1, -1], [-1, -1, -1]]), truth) == pytest.approx(
        1 / 6)  # -1: slots an index couldn't fill
    # only the first k found count: an index asked for more doesn't get extra credit
    assert ann.recall_vs_exact(np.array([[7, 8, 9, 1, 2, 3]]), truth[:1]) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4G", 4 << 30), ("512M", 512 * MIB), ("512m", 512 * MIB), ("1.5GB", int(1.5 * (1 << 30))),
     ("4GiB", 4 << 30), ("2k", 2048), (" 1T ", 1 << 40), ("1000", 1000), (1000, 1000)],
)
def test_parse_bytes(text, expected):
    assert ann.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "G", "abc", "4X", "inf", "-1G", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="not a size"):
        ann.parse_bytes(text)


# --------------------------------------------------------------------------------------------
# The benchmark's pieces
# --------------------------------------------------------------------------------------------


def test_mixture_looks_like_clip_embeddings():
    mixture = Mixture.make(DIM, components=64, seed=0)
    x = mixture.draw(3000, np.random.default_rng(0))
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    random_pairs = float((x[:500] @ x[500:1000].T).mean())
    nearest = faiss.knn(x[:200], x[200:], 1, metric=faiss.METRIC_INNER_PRODUCT)[0]
    assert 0.2 < random_pairs < 0.7  # a shared direction, not isotropic noise (~0)
    assert float(nearest.mean()) > random_pairs + 0.2  # real neighbourhoods


def test_exact_collection_keeps_one_copy():
    mixture = Mixture.make(16, components=8, seed=0)
    exact, flat, view = exact_collection(mixture, 1000, seed=0, chunk=300)
    assert exact.ntotal == 1000 and view.shape == (1000, 16) and not view.flags.owndata
    view_again = faiss.rev_swig_ptr(flat.get_xb(), 1000 * 16).reshape(1000, 16)
    assert np.shares_memory(view, view_again) or view.ctypes.data == view_again.ctypes.data
    assert exact.search(view[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert serialized_bytes(exact) == len(faiss.serialize_index(exact))


class _TickingClock:
    """A perf_counter that moves one second per reading, whatever the machine does."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_build_within_gives_up_on_a_projection(clustered, monkeypatch):
    import vqret.benchmarks.ann as bench_ann

    vectors, _ = clustered
    plan = ann.plan_index(len(vectors), DIM, "hnsw")
    # On the ticking clock training takes 1 s and each 1000-vector chunk 1 s: after the
    # first chunk 4000 project to 1 + 1 x 4 x 1.2 (HNSW's margin) = 5.8 s.
    monkeypatch.setattr(bench_ann, "time", _TickingClock())
    with pytest.raises(BudgetExceeded, match=r"projected 6 s > budget 5 s \(1,000 of 4,000 added"):
        build_within(plan, vectors, budget_s=5, min_add_s=0.0)
    with pytest.raises(BudgetExceeded, match="training alone took 1 s > budget 0 s"):
        build_within(plan, vectors, budget_s=0.5)
    # not before min_add_s of adding: 3 chunks (3 s) are not enough to judge the rate by
    index, train_s, add_s = build_within(plan, vectors, budget_s=5, min_add_s=4.0)
    assert index.ntotal == len(vectors) and (train_s, add_s) == (1.0, 5.0)
    monkeypatch.undo()
    index, train_s, add_s = build_within(plan, vectors, budget_s=600)
    assert index.ntotal == len(vectors) and train_s >= 0 and add_s > 0


def test_benchmark_runs_small(tmp_path):
    # matplotlib is in the bench extra, not the test one: without it, everything but the plot
    plot = tmp_path / "ann.png" if importlib.util.find_spec("matplotlib") else None
    report = run_ann_benchmark([3000], dim=32, kinds=["auto", "flat", "ivf", "hnsw"],
                               n_queries=50, components=32, plot=plot)
    result = report["results"][0]
    assert [r["kind"] for r in result["rows"]] == ["auto", "flat", "ivf", "hnsw"]
    assert result["summary"]["auto_index"] == "IDMap2,Flat"  # 3000 vectors: exact
    # auto planned the exact index, so it shares flat's row, one measurement: speedup 1
    assert result["summary"]["auto_single_ms"] == result["summary"]["flat_single_ms"]
    assert result["summary"]["auto_speedup"] == 1.0
    assert result["summary"]["meets_target"] is None  # the target is stated at 1M
    for row in result["rows"]:
        assert row["status"] == "ok" and 0.0 <= row["recall_at_10"] <= 1.0
        assert row["batch_qps"] > 0 and row["single_ms"] > 0 and row["bytes_per_vector"] > 0
        assert row["sweep"]
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Exact re-ranking of product quantization
# --------------------------------------------------------------------------------------------


def test_pq_plans_re_rank_within_the_memory_budget():
    n, dim = 1_000_000, 512
    roomy = ann.plan_index(n, dim, "ivfpq", memory=1 << 40)
    assert roomy.refine == "ram" and roomy.bytes_per_vector == 64 + 16 + 4 * dim
    assert roomy.faiss_factory == f"IDMap,{roomy.factory},RFlat"
    # auto takes PQ only when 8-bit IVF doesn't fit: the float32 vectors can't either, so they
    # stay on disk (memory-mapped) and the budget counts the codes alone
    tight = ann.plan_index(n, dim, "auto", memory=n * (dim + 16) - 1)
    assert tight.kind == "ivfpq" and tight.refine == "mmap"
    assert n * tight.bytes_per_vector <= n * (dim + 16) and "outside" in tight.reason
    plain = ann.plan_index(n, dim, "ivfpq", refine=False)
    assert plain.refine == "" and plain.faiss_factory == plain.factory


def test_re_ranking_lifts_pq_recall(clustered):
    vectors, queries = clustered
    truth = exact_neighbours(vectors, queries)
    recall = {}
    for refine in (False, True):
        plan = ann.plan_index(len(vectors), DIM, "ivfpq", refine=refine)
        index = ann.build_index(plan, np.arange(len(vectors)), vectors)
        ann.tune(index, plan, vectors, target=0.95)
        recall[refine] = ann.recall_vs_exact(index.search(queries, 10)[1], truth)
    # measured on this set (4-bit PQ32 at d = 64): 0.60 without, 0.97 with k_factor 8
    assert recall[False] < 0.8
    assert recall[True] >= 0.92
    assert set(plan.params) == {"nprobe", "k_factor"} and plan.recall_at_10 >= 0.95
    assert plan.params["k_factor"] in ann.REFINE_K_FACTORS


def _pq_store(tmp_path, vectors):
    import pyarrow as pa
    from vqret.retrieval.embedder import ModelSpec
    from vqret.retrieval.store import Store, embeddings_to_arrow

    (tmp_path / "root").mkdir()
    store = Store.create(tmp_path / "s.vqret", ModelSpec("none", "none", "none", DIM),
                         tmp_path / "root")
    with store.writer() as writer:
        ids = writer.allocate_ids(len(vectors))
        writer.commit(pa.table({"id": pa.array(ids, pa.int64()),
                                "path": [f"{i}.png" for i in ids],
                                "embedding": embeddings_to_arrow(vectors)}))
    return store


def test_re_ranked_index_round_trips_and_updates_in_place(clustered, tmp_path):
    from vqret.retrieval import index as vindex

    vectors, queries = clustered
    store = _pq_store(tmp_path, vectors[:3000])
    # a budget too small for the float32 vectors: re-ranked from the memory-mapped file
    plan = vindex.update_index(store, kind="ivfpq", memory=3000 * 100)
    assert plan.refine == "mmap" and set(plan.params) == {"nprobe", "k_factor"}
    loaded, meta = vindex.load_saved(store)
    assert ann.refine_of(loaded) is not None and meta["plan"]["params"] == plan.params
    assert ann.refine_of(loaded).k_factor == plan.params["k_factor"]
    assert faiss.extract_index_ivf(loaded).nprobe == plan.params["nprobe"]
    in_memory, _ = vindex.load_saved(store, writable=True)
    assert np.array_equal(loaded.search(queries, 10)[1], in_memory.search(queries, 10)[1])
    truth = exact_neighbours(vectors[:3000], queries)
    assert ann.recall_vs_exact(loaded.search(queries, 10)[1], truth) >= 0.9
    # k = everything: the IVF widening goes through the re-ranking stage's parameters
    _, ids = vindex.search_index(loaded, queries[:2], 3000)
    assert sorted(ids[0]) == list(range(3000))

    # remove 100 rows and add 1000: in place (no retraining), the removed ones are gone
    import pyarrow as pa
    from vqret.retrieval.store import embeddings_to_arrow

    start = store.table_generation()
    with store.writer() as writer:
        new = writer.allocate_ids(1000)
        writer.commit(pa.table({"id": pa.array(new, pa.int64()),
                                "path": [f"{i}.png" for i in new],
                                "embedding": embeddings_to_arrow(vectors[3000:])}),
                      remove_ids=range(100))
        changed = writer.changed_ids()
    after = vindex.update_index(store, memory=3900 * 100, start_generation=start,
                                changed_ids=changed)
    assert after.trained_n == 3000 and after.refine == "mmap"  # kept its quantizer
    updated, _ = vindex.load_saved(store)
    assert updated.ntotal == 3900
    found = updated.search(queries, 10)[1]
    assert not np.isin(found, np.arange(100)).any()
    keep_ids, keep_vectors = store.vectors()
    truth = keep_ids[exact_neighbours(keep_vectors, queries)]
    assert ann.recall_vs_exact(found, truth) >= 0.9


def test_opq_behind_the_re_ranking_stage_gets_the_short_training():
    plan = ann.plan_index(100_000, 512, "ivfpq", memory=1 << 40)
    assert plan.factory.startswith("OPQ") and plan.refine
    index = ann.new_index(plan, 512)  # held: the inner proxies don't own their objects
    pre = faiss.downcast_index(ann.refine_of(index).base_index)
    opq = faiss.downcast_VectorTransform(pre.chain.at(0))
    assert (opq.niter, opq.max_train_points) == (ann.OPQ_NITER, ann.OPQ_TRAIN_POINTS)
