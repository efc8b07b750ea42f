"""`vqret bench ray --part embed`: the Ray engine's embedding next to the local engine's.

The same folder indexed into fresh stores by the local engine (the baseline) and by the Ray
engine with one actor holding all CPUs and with one actor per CPU. Per configuration: wall
seconds, images/s end to end, the working rate (local engine: after its first batch; Ray: the
actors' own, from their busy time, `RayEmbedder.last_run`) and the fixed cost, i.e. the wall
time that rate doesn't explain (start-up, tail; `ray.init` is timed once, apart). Ratios are
to the local engine of the same run. The engines must agree: min cosine between the
embeddings of the same path. (Issue #8: README's 100M-image arithmetic checked against what
is measured per worker; the index half is benchmarks/ray_index.py.)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

Log = Callable[[str], Any]

# ../shared/data beside the repository (see its README): real photos, not the project's own
DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-subset"


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
    from vqret.retrieval.distributed import RayEmbedder, ray_update_after_write, require_ray
    from vqret.retrieval.embedder import Embedder
    say = log or (lambda message: None)
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

        ray = require_ray()
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
                    return RayEmbedder(
                        spec, num_workers=actors, cpus_per_worker=per, batch_size=batch_size,
                        device="cpu", precision=precision, text_embedder=local_embedder)

                say(f"{name}: {actors} actor(s) x {per:g} CPU")
                row, embedder, store = _measure(name, make_ray, work / f"{name}.vqret", source,
                                         index_updater=ray_update_after_write)
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

