"""`vqret bench ray --part index`: the sharded IVF build next to the in-process one.

A synthetic store of N unit vectors (benchmarks/ann_data.py's CLIP-like mixture, written as the
store's Parquet parts), indexed in-process (`update_index`) and by `build_sharded_index` on a
local Ray, each build in a fresh process (`python -m vqret.benchmarks.ray_index MODE ARGS`) so
that its peak RSS is its own. Headline: the driver's peak RSS per raw float32 byte, and
sharded / in-process wall time; recall@10 of both saved indexes against exact search on fresh
queries. (The embedding half is benchmarks/ray_embed.py.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Log = Callable[[str], Any]

PART_ROWS = 100_000  # rows per Parquet part of the synthetic store (the Indexer commits ~this)
N_QUERIES = 300
BUILDS = ("in-process", "sharded")
K = 10


def write_vector_store(path: Path, n: int, dim: int, *, part_rows: int = PART_ROWS,
                       seed: int = 0) -> Any:
    """A store of `n` CLIP-like unit vectors (benchmarks/ann_data.py's mixture), drawn and
    committed one Parquet part at a time: the generator never holds the collection."""
    import pyarrow as pa
    from vqret.retrieval.embedder import ModelSpec
    from vqret.retrieval.store import Store, embeddings_to_arrow, now_utc

    from .ann_data import Mixture

    root = path.parent / (path.name + "-root")
    root.mkdir(parents=True, exist_ok=True)
    store = Store.create(path, ModelSpec("none", "none", "none", dim), root)
    mixture = Mixture.make(dim)
    rng = np.random.default_rng([seed, n])
    with store.writer() as writer:
        for start in range(0, n, part_rows):
            chunk = mixture.draw(min(part_rows, n - start), rng)
            ids = writer.allocate_ids(len(chunk))
            writer.commit(pa.table({
                "id": pa.array(ids, pa.int64()),
                "path": [f"{i}.jpg" for i in ids],
                "embedding": embeddings_to_arrow(chunk),
                "added_at": pa.array([now_utc()] * len(chunk), pa.timestamp("us", "UTC")),
            }))
    return store


def exact_top_k(store: Any, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Ids of each query's exact top-k, read part by part (never all vectors at once)."""
    import faiss
    from vqret.retrieval.distributed.sharded_index import iter_part_vectors, merge_topk

    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    paths = [str(store.path / "images" / name) for name in store.parts()]
    for chunk_ids, vectors in iter_part_vectors(paths, store.dim):
        s, pos = faiss.knn(queries, vectors, min(k, len(vectors)), faiss.METRIC_INNER_PRODUCT)
        scores, ids = merge_topk(scores, ids, s, chunk_ids[pos], k)
    return ids


def saved_index_recall(store: Any, queries: np.ndarray, truth: np.ndarray) -> float:
    """recall@k of the store's saved index, at the search parameters it was tuned to."""
    from vqret.retrieval import ann
    from vqret.retrieval.index import load_saved

    store.refresh()
    saved = load_saved(store)
    if saved is None:
        raise RuntimeError(f"{store.path}: no saved index after the build")
    index, meta = saved
    ann.set_search_params(index, meta["plan"].get("params", {}))
    found = index.search(queries, truth.shape[1])[1]
    return float(ann.recall_vs_exact(found, truth))


def _build_in_subprocess(mode: str, args: dict[str, Any], say: Log) -> dict[str, Any]:
    command = [sys.executable, "-m", "vqret.benchmarks.ray_index", mode, json.dumps(args)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{mode} build failed ({proc.returncode}): " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_index(
    n: int = 1_000_000,
    *,
    dim: int = 512,
    kind: str = "ivf",
    rows_per_shard: int = 500_000,
    part_rows: int = PART_ROWS,
    cpus: int | None = None,
    address: str | None = None,
    work: Path | None = None,
    builds: tuple[str, ...] = BUILDS,
    log: Log | None = None,
) -> dict[str, Any]:
    """In-process vs sharded IVF build of an `n` x `dim` store; see the module notes.

    `builds` may leave one out: at sizes where the in-process build wouldn't fit this
    machine's memory (it peaks at ~4x the raw vectors), measure the sharded one alone."""
    from vqret.retrieval import ann
    from vqret.retrieval.store import Store

    from .ann_data import Mixture

    say = log or (lambda message: None)
    if n < ann.MIN_TRAIN or dim < 2:
        raise ValueError(f"--rows must be >= {ann.MIN_TRAIN} and --dim >= 2")
    plan = ann.plan_index(n, dim, kind, refine=False)
    if plan.kind not in ("ivf", "ivfpq"):
        raise ValueError(f"sharded building makes IVF indexes; --kind {kind} at {n} rows "
                         f"gives {plan.kind}")
    if plan.kind == "ivfpq":
        # update_index would plan exact re-ranking that the sharded build leaves out: not the
        # same index, so not a comparison
        raise ValueError("compare --kind ivf or ivf8: the in-process ivfpq plan re-ranks, "
                         "the sharded one doesn't")
    if not builds or set(builds) - set(BUILDS):
        raise ValueError(f"builds: one or both of {', '.join(BUILDS)}, not {builds}")
    if work is not None and not Path(work).is_dir():
        raise ValueError(f"{work}: no such folder for the temporary store")
    cpus = cpus or os.cpu_count() or 1
    tmp = tempfile.TemporaryDirectory(prefix="vqret-bench-ray-index-", dir=work)
    try:
        path = Path(tmp.name) / "vectors.vqret"
        started = time.perf_counter()
        say(f"writing {n:,} x {dim} vectors in parts of {part_rows:,} rows")
        store = write_vector_store(path, n, dim, part_rows=part_rows)
        say(f"  {time.perf_counter() - started:.1f} s, {len(store.parts())} parts")
        queries = Mixture.make(dim).draw(N_QUERIES, np.random.default_rng([1, n]))
        truth = exact_top_k(store, queries)
        raw = n * dim * 4
        done = {}
        args = {"store": str(path), "kind": kind, "rows_per_shard": rows_per_shard,
                "cpus": cpus, "address": address}
        for mode in (b for b in BUILDS if b in builds):
            say(f"{mode} build ({plan.factory}) in a fresh process")
            result = _build_in_subprocess(mode, args, say)
            store = Store(path)
            result["recall_at_10"] = round(saved_index_recall(store, queries, truth), 4)
            result["driver_peak_per_raw_byte"] = round(result["driver_peak_rss_bytes"] / raw, 3)
            # less what the process held before building (imports; Ray's client): the part
            # that grows with the collection
            grown = result["driver_peak_rss_bytes"] - result["driver_rss_before_bytes"]
            result["driver_build_per_raw_byte"] = round(grown / raw, 3)
            done[mode] = result
            peak = result["driver_peak_rss_bytes"] / 2**30
            say(f"  {result['wall_s']:.1f} s, driver peak {peak:.2f} GiB = "
                f"{result['driver_peak_per_raw_byte']:.2f} x raw vectors, recall@10 "
                f"{result['recall_at_10']:.3f}")
    finally:
        tmp.cleanup()
    report = {
        "part": "index",
        "n": n,
        "dim": dim,
        "kind": kind,
        "factory": plan.factory,
        "raw_vector_bytes": raw,
        "part_rows": part_rows,
        "rows_per_shard": rows_per_shard,
        "cpu_count": os.cpu_count(),
        "queries": N_QUERIES,
        "in_process": done.get("in-process"),
        "sharded": done.get("sharded"),
    }
    if len(done) == 2:
        inproc, sharded = done["in-process"], done["sharded"]
        report["sharded_wall_ratio"] = round(sharded["wall_s"] / inproc["wall_s"], 3)
        report["driver_peak_ratio"] = round(
            sharded["driver_peak_rss_bytes"] / inproc["driver_peak_rss_bytes"], 3)
    return report


# ---- the builds themselves, each run as `python -m vqret.benchmarks.ray_index MODE ARGS` ----


def _peak_rss(pid: int | str = "self", field: str = "VmHWM") -> int:
    """Peak resident set size in bytes (VmHWM; VmRSS: now); 0 for a process that is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    if pid == "self" and field == "VmHWM":  # no /proc: getrusage has the same figure (kB on Linux)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 0


class RayWorkerPeaks:
    """Samples the peak RSS of this node's Ray worker processes (tasks, actors) while a block
    runs, in the cluster this process is connected to (the workers are its raylet's children:
    another Ray on the same machine doesn't count).

    VmHWM is each process's own high-water mark, so a sample anywhere after a task's peak
    sees it, as long as the worker is still alive (Ray keeps idle workers up to its CPU
    count). Idle workers count too, but they hold far less than a task filling a shard."""

    def __init__(self, every: float = 0.2):
        self.every = every
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._raylet: int | None = None

    @staticmethod
    def _cmdline(pid: str) -> bytes:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""

    @staticmethod
    def _parent(pid: str) -> int | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # the command name (field 2) may hold spaces: the fields after its ')' don't
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def _find_raylet(self) -> int | None:
        import ray

        socket = ray._private.worker.global_worker.node.raylet_socket_name
        mark = f"--raylet_socket_name={socket}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if mark in self._cmdline(pid):
                return int(pid)
        return None

    def sample(self) -> None:
        if self._raylet is None:
            return
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if self._parent(pid) != self._raylet:
                continue
            cmd = self._cmdline(pid)
            if cmd.startswith(b"ray::") or b"default_worker.py" in cmd:
                self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0), _peak_rss(pid))

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> RayWorkerPeaks:
        self._raylet = self._find_raylet()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _build_main(mode: str, args: dict[str, Any]) -> dict[str, Any]:
    from vqret.retrieval.store import Store

    store = Store(Path(args["store"]))
    out: dict[str, Any] = {"mode": mode}
    if mode == "in-process":
        from vqret.retrieval.index import update_index

        out["driver_rss_before_bytes"] = _peak_rss(field="VmRSS")
        started = time.perf_counter()
        with store.writer():
            plan = update_index(store, kind=args["kind"])
        out["wall_s"] = round(time.perf_counter() - started, 3)
    else:
        import ray
        from vqret.retrieval.distributed import build_sharded_index

        started = time.perf_counter()
        if args["address"]:
            ray.init(address=args["address"], include_dashboard=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=args["cpus"], include_dashboard=False,
                     logging_level=logging.WARNING)
        out["ray_init_s"] = round(time.perf_counter() - started, 3)
        # what the driver holds before building (ray, faiss, the store's manifest): the
        # build's own memory is the peak minus this
        out["driver_rss_before_bytes"] = _peak_rss(field="VmRSS")
        with RayWorkerPeaks() as workers:
            started = time.perf_counter()
            with store.writer():
                plan = build_sharded_index(store, args["kind"],
                                           rows_per_shard=args["rows_per_shard"])
            out["wall_s"] = round(time.perf_counter() - started, 3)
        out["ray_worker_peak_rss_bytes"] = max(workers.peaks.values(), default=0)
        # the smallest: a worker that ran little or nothing, i.e. what any worker costs
        out["ray_worker_min_peak_rss_bytes"] = min(workers.peaks.values(), default=0)
        out["ray_workers_seen"] = len(workers.peaks)
        ray.shutdown()
    out["driver_peak_rss_bytes"] = _peak_rss()
    out["factory"] = plan.factory
    out["nprobe"] = plan.params.get("nprobe")
    out["tuned_recall_at_10"] = plan.recall_at_10
    return out


if __name__ == "__main__":
    print(json.dumps(_build_main(sys.argv[1], json.loads(sys.argv[2]))))
