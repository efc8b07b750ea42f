"""`vqret bench ray`: what the Ray engine costs and gives, next to the local engine, same run.

Two parts, runnable separately (issue #8 asks for README's 100M-image arithmetic to be checked
against what is measured per worker):

- embed: the same folder indexed into fresh stores by the local engine (the baseline) and by
  the Ray engine with one actor holding all CPUs and with one actor per CPU. Per
  configuration: wall seconds, images/s end to end, the working rate (local engine: after its
  first batch; Ray: the actors' own, from their busy time, `RayEmbedder.last_run`) and the
  fixed cost, i.e. the wall time that rate doesn't explain (start-up, tail; `ray.init` is
  timed once, apart). Ratios are to the local engine of the same run. The engines must
  agree: min cosine between the embeddings of the same path.
- index: a synthetic store of N unit vectors (benchmarks/ann.py's CLIP-like mixture, written
  as the store's Parquet parts), indexed in-process (`update_index`) and by
  `build_sharded_index` on a local Ray, each build in a fresh process so that its peak RSS is
  its own. Headline: the driver's peak RSS per raw float32 byte, and sharded / in-process
  wall time; recall@10 of both saved indexes against exact search on fresh queries.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

Log = Callable[[str], Any]

# ../shared/data beside the repository (see its README): real photos, not the project's own
DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-subset"
PART_ROWS = 100_000  # rows per Parquet part of the synthetic store (the Indexer commits ~this)
N_QUERIES = 300
BUILDS = ("in-process", "sharded")
K = 10


def _say(log: Log | None) -> Log:
    return log if log is not None else (lambda message: None)


# --------------------------------------------------------------------------------------------
# embed: local engine vs Ray actor pools
# --------------------------------------------------------------------------------------------


class _Clocked:
    """An embedder that notes when its first and last batch came out (all else delegated),
    so the Indexer runs unchanged and the start-up cost can be read off its stream."""

    def __init__(self, embedder: Any, started: float):
        self._embedder = embedder
        self.started = started
        self.first_s: float | None = None
        self.last_s: float | None = None
        self.first_images = 0
        self.images = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)

    def iter_image_files(self, paths: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in self._embedder.iter_image_files(paths, *args, **kwargs):
            now = time.perf_counter() - self.started
            if self.first_s is None:
                self.first_s, self.first_images = now, len(batch.indices)
            self.last_s = now
            self.images += len(batch.indices)
            yield batch


def _copy_images(source: Path, dest: Path, limit: int) -> int:
    """The first `limit` images of `source` (walk order) copied under `dest`, paths kept:
    every engine indexes exactly this folder, and the copy warms the page cache for all."""
    import itertools

    from vqret.retrieval.walk import walk_images

    copied = 0
    for entry in itertools.islice(walk_images(source), limit):
        target = dest / entry.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / entry.relpath, target)
        copied += 1
    return copied


def _vectors_by_path(store: Any) -> dict[str, np.ndarray]:
    rows = store.read_table(["path", "embedding"])
    from vqret.retrieval.store import embeddings_from_arrow

    vectors = embeddings_from_arrow(rows.column("embedding"), store.dim)
    return dict(zip(rows.column("path").to_pylist(), vectors, strict=True))


def min_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Smallest cosine between the vectors of the same path (paths must match)."""
    if a.keys() != b.keys():
        raise RuntimeError(f"the engines stored different paths: {len(a)} vs {len(b)} rows")
    if not a:
        return 1.0
    keys = sorted(a)
    x = np.stack([a[k] for k in keys])
    y = np.stack([b[k] for k in keys])
    cos = np.sum(x * y, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    return float(cos.min())


def _measure(name: str, make: Callable[[], Any], store_path: Path, folder: Path,
             **indexer_kwargs: Any) -> tuple[dict[str, Any], Any, Any]:
    """Index `folder` into a new store with the embedder `make` returns, timed from
    `make` on (model load included: the Ray actors load theirs inside the run too)."""
    from vqret.retrieval.indexer import index_folder
    from vqret.retrieval.store import Store

    started = time.perf_counter()
    clocked = _Clocked(make(), started)
    store = Store.create(store_path, clocked.spec, folder)
    report = index_folder(store, clocked, folder, **indexer_kwargs)
    wall = time.perf_counter() - started
    images = report.embedded
    first, last = clocked.first_s or wall, clocked.last_s or wall
    steady = clocked.images - clocked.first_images
    row = {
        "engine": name,
        "images": images,
        "failed": len(report.failed),
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 3),
        # Everything before the first batch came out: model load (per actor for Ray), walk,
        # hash, worker start-up. What a 100M-image run pays once, not per image.
        "first_batch_s": round(first, 3),
        # The rate once the stream runs: batches after the first, over the time they took.
        "steady_images_per_s": round(steady / (last - first), 3) if last > first else None,
    }
    return row, clocked._embedder, store


def run_embed(
    folder: Path,
    *,
    images: int = 512,
    model: str = "ViT-B-32",
    pretrained: str = "none",
    batch_size: int = 32,
    precision: str = "fp32",
    cpus: int | None = None,
    address: str | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Local engine, Ray 1 actor x all CPUs, Ray 1 actor per CPU, on the same files."""
    import ray as _ray  # noqa: F401 - fails early, before a model is loaded
    from vqret.retrieval import ray_engine
    from vqret.retrieval.embedder import Embedder
    say = _say(log)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"not a folder: {folder}")
    if images < 1:
        raise ValueError("--images must be >= 1")
    with tempfile.TemporaryDirectory(prefix="vqret-bench-ray-") as tmp:
        work = Path(tmp)
        source = work / "images"
        copied = _copy_images(folder, source, images)
        if not copied:
            raise ValueError(f"no image files under {folder}")
        say(f"{copied} images from {folder}")

        ray = ray_engine.require_ray()
        started = time.perf_counter()
        we_started = not ray.is_initialized()
        if we_started:
            if address:
                ray.init(address=address, include_dashboard=False,
                         logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=cpus or os.cpu_count(), include_dashboard=False,
                         logging_level=logging.WARNING)
        ray_init_s = time.perf_counter() - started
        ray_cpus = int(ray.cluster_resources().get("CPU", 1))
        say(f"ray.init: {ray_init_s:.2f} s, {ray_cpus} CPUs")
        try:
            rows, vectors = [], {}
            local_embedder = None

            def make_local() -> Any:
                nonlocal local_embedder
                local_embedder = Embedder(model, pretrained, device="cpu",
                                          batch_size=batch_size, precision=precision)
                return local_embedder

            say(f"local engine: {model} (pretrained={pretrained}), batch {batch_size}, "
                f"{precision}")
            row, _, store = _measure("local", make_local, work / "local.vqret", source)
            row.update(actors=1, cpus_per_actor=None,
                       torch_threads=_torch_threads(), decode_workers=local_embedder.num_workers)
            rows.append(row)
            vectors["local"] = _vectors_by_path(store)
            say(_row_text(row))
            spec = local_embedder.spec
            for name, actors, per in (("ray-1-actor", 1, float(ray_cpus)),
                                      ("ray-actor-per-cpu", ray_cpus, 1.0)):
                def make_ray(actors: int = actors, per: float = per) -> Any:
                    return ray_engine.RayEmbedder(
                        spec, num_workers=actors, cpus_per_worker=per, batch_size=batch_size,
                        device="cpu", precision=precision, text_embedder=local_embedder)

                say(f"{name}: {actors} actor(s) x {per:g} CPU")
                row, embedder, store = _measure(name, make_ray, work / f"{name}.vqret", source,
                                         index_updater=ray_engine.ray_update_after_write)
                run = embedder.last_run
                # Ray Data hands results back a block (several batches) at a time, here mostly
                # near the end: the rate of that stream says nothing; the actors' busy time does
                row["steady_images_per_s"] = None
                busy = float(run.get("worker_seconds", 0.0))
                row.update(actors=int(run.get("actors", actors)),
                           cpus_per_actor=float(run.get("num_cpus", per)),
                           worker_busy_s=round(busy, 6),
                           # one actor's rate while it works (images over the actors' summed
                           # busy time): what each worker adds to a cluster
                           per_actor_images_per_s=(
                               round(row["images"] / busy, 3) if busy else None))
                rows.append(row)
                vectors[name] = _vectors_by_path(store)
                say(_row_text(row))
        finally:
            if we_started:
                ray.shutdown()
        n_paths = len(vectors["local"])

    local = rows[0]
    for row in rows:
        row["ratio_images_per_s"] = round(row["images_per_s"] / local["images_per_s"], 3)
        if row["steady_images_per_s"] and local["steady_images_per_s"]:
            row["ratio_steady"] = round(
                row["steady_images_per_s"] / local["steady_images_per_s"], 3)
        if row.get("per_actor_images_per_s") and local["steady_images_per_s"]:
            # per CPU: the unit a cluster is bought in; the local engine uses all CPUs at once
            row["per_cpu_images_per_s"] = round(
                row["per_actor_images_per_s"] / row["cpus_per_actor"], 3)
            local_per_cpu = local["steady_images_per_s"] / local["torch_threads"]
            row["local_per_cpu_images_per_s"] = round(local_per_cpu, 3)
            row["ratio_per_cpu"] = round(row["per_cpu_images_per_s"] / local_per_cpu, 3)
        # The wall time the working rate doesn't explain: start-up (Ray: actor processes,
        # imports, model load per actor) and the tail. A run of N images takes about
        # fixed_s + N / (rate x actors), which is how the figures extrapolate to 100M.
        rate = row.get("per_actor_images_per_s") or row["steady_images_per_s"]
        if rate:
            row["fixed_s"] = round(row["wall_s"] - row["images"] / (rate * row["actors"]), 3)
        if row is not local:
            row["min_cosine_vs_local"] = round(min_cosine(vectors["local"], vectors[row["engine"]]),
                                               6)
    return {
        "part": "embed",
        "folder": str(folder),
        "n_images": n_paths,
        "model": model,
        "pretrained": pretrained,
        "random_weights": pretrained == "none",
        "batch_size": batch_size,
        "precision": precision,
        "cpu_count": os.cpu_count(),
        "ray_cpus": ray_cpus,
        "ray_init_s": round(ray_init_s, 3),
        "configs": rows,
        "min_cosine": min(r["min_cosine_vs_local"] for r in rows[1:]),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _row_text(row: dict[str, Any]) -> str:
    extra = ""
    if row.get("per_actor_images_per_s"):
        extra = (f", per actor {row['per_actor_images_per_s']:.1f}/s from busy time "
                 f"({row['worker_busy_s']:.1f} s)")
    steady = row["steady_images_per_s"]
    then = f", then {steady:.1f}/s" if steady else ""
    return (f"  {row['engine']}: {row['images']} images in {row['wall_s']:.1f} s = "
            f"{row['images_per_s']:.1f}/s; first batch after {row['first_batch_s']:.1f} s"
            f"{then}{extra}")


# --------------------------------------------------------------------------------------------
# index: in-process vs sharded build, each in a fresh process
# --------------------------------------------------------------------------------------------


def write_vector_store(path: Path, n: int, dim: int, *, part_rows: int = PART_ROWS,
                       seed: int = 0) -> Any:
    """A store of `n` CLIP-like unit vectors (benchmarks/ann.py's mixture), drawn and
    committed one Parquet part at a time: the generator never holds the collection."""
    import pyarrow as pa
    from vqret.retrieval.embedder import ModelSpec
    from vqret.retrieval.store import Store, embeddings_to_arrow, now_utc

    from .ann import Mixture

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
    from vqret.retrieval.ray_engine import _iter_part_vectors, _merge_topk

    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    paths = [str(store.path / "images" / name) for name in store.parts()]
    for chunk_ids, vectors in _iter_part_vectors(paths, store.dim):
        s, pos = faiss.knn(queries, vectors, min(k, len(vectors)), faiss.METRIC_INNER_PRODUCT)
        scores, ids = _merge_topk(scores, ids, s, chunk_ids[pos], k)
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
    command = [sys.executable, "-m", "vqret.benchmarks.ray_engine", mode, json.dumps(args)]
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

    from .ann import Mixture

    say = _say(log)
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


# ---- the builds themselves, each run as `python -m vqret.benchmarks.ray_engine MODE ARGS` ----


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
        from vqret.retrieval.ray_engine import build_sharded_index

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
