"""Reading images on a Ray cluster: embedding them in a Ray Data actor pool, hashing them in
Ray tasks, with the interfaces the local engine's Indexer already takes.

`RayEmbedder.iter_image_files` is `Embedder.iter_image_files` (a list of files in,
`ImageBatch`es out, in any order, failures as data) and `RayEmbedder.hash_files` is a
`Hasher`, so the Indexer runs unchanged:

    (position, path) blocks -> map_batches(_EmbedWorker, actor pool: model loaded once per
        actor, 1 GPU each when the cluster has GPUs) -> iter_batches on the driver

The actors hash the bytes they read to embed (`hashes_what_it_reads`), so a first run, which
has no renames or copies to recognise, reads each file once; an incremental run has the new
and changed files hashed first by `hash_files`, also on the cluster: the driver reads no image.
The actors read each file's header facts (EXIF time, camera, GPS: metadata.py) from the same
bytes, and `read_facts` reads those of an old store's rows in Ray tasks when the store is
upgraded.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..content_hash import stream_hash, unreadable
from ..device import check_device_name
from ..embedder import Embedder, ImageBatch, ModelSpec, _ImageFiles, check_precision
from ..hasher import hash_named
from ..metadata import ImageFacts, read_facts
from ..remote import is_url, read_bytes
from .cluster import cluster_resources, connect, path_blocks, quiet_ray_data, require_ray, results

# Rows per (position, path) block handed to the actor pool: large enough that per-block
# scheduling overhead is noise at 100M images, small enough that blocks spread over actors.
MAX_BLOCK_ROWS = 4096
# Hashing: files per Ray Data block and per task call, and reading threads per task.
HASH_BLOCK_ROWS = 1024
HASH_BATCH_ROWS = 256
HASH_THREADS = 4


class _EmbedWorker:
    """One actor of the pool: loads the model once, then decodes and embeds batches.

    Ray Data constructs it with no arguments; the configuration is a class attribute of the
    subclass `RayEmbedder` makes for each run (see `_worker_class`).
    """

    config: dict[str, Any] = {}

    def __init__(self) -> None:
        import torch

        cfg = self.config
        # One intra-op thread per CPU Ray gave the actor: more would fight the other actors.
        torch.set_num_threads(max(1, int(cfg["num_cpus"])))
        self.embedder = Embedder.from_spec(
            ModelSpec.from_dict(cfg["spec"]),
            device=cfg["device"],
            batch_size=cfg["batch_size"],
            num_workers=0,
            precision=cfg["precision"],
            draft_decode=cfg["draft_decode"],
        )
        self.draft = self.embedder.image_size if cfg["draft_decode"] else None
        # PIL decodes and resizes without the GIL, so threads keep a GPU actor fed.
        threads = int(cfg["decode_threads"])
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def _decode(
        self, path: str
    ) -> tuple[Any, tuple[int, int], str | None, str, ImageFacts | None]:
        """(pixels, size, failure cause, content hash, header facts): each file is read once,
        into memory, and hashed there, so a first run needs no separate hash pass."""
        try:
            data = read_bytes(path) if is_url(path) else Path(path).read_bytes()
        except OSError as err:
            return None, (0, 0), unreadable(err), "", None
        # The local engine's own per-file decode: same loader, draft size, transform, causes,
        # and the same facts, read from these bytes.
        _, pixels, size, cause, facts = _ImageFiles(
            [data], self.embedder.preprocess, self.draft
        )[0]
        return pixels, size, cause, stream_hash(io.BytesIO(data)), facts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        started = time.perf_counter()
        paths = [str(p) for p in batch["path"]]
        decoded = list(self.pool.map(self._decode, paths) if self.pool else map(
            self._decode, paths))
        good = [i for i, (pixels, *_) in enumerate(decoded) if pixels is not None]
        dim = self.embedder.embed_dim
        embeddings = np.zeros((len(paths), dim), np.float32)  # (B, D)
        if good:
            pixels = torch.stack([decoded[i][0] for i in good])
            embeddings[good] = self.embedder.encode_pixels(pixels)
        return {
            "position": np.asarray(batch["position"], np.int64),
            "embedding": embeddings,  # zeros where decoding failed; `error` says why
            "width": np.asarray([d[1][0] for d in decoded], np.int32),
            "height": np.asarray([d[1][1] for d in decoded], np.int32),
            "error": np.asarray([d[2] or "" for d in decoded], dtype=object),
            "hash": np.asarray([d[3] for d in decoded], dtype=object),
            "facts": _facts_column([d[4] for d in decoded]),
            # The actor's busy time, spread over the rows: images/s per worker without the
            # start-up and queueing that the driver's clock also sees.
            "seconds": np.full(len(paths), (time.perf_counter() - started) / len(paths)),
        }


class RayEmbedder:
    """`Embedder.iter_image_files` on a Ray cluster; texts are embedded locally.

    `spec` is the store's ModelSpec: every actor rebuilds exactly the store's model from it
    (`Embedder.from_spec`), so weights must be reachable on every node: a pretrained tag in
    each node's Hugging Face cache (or downloadable), or a checkpoint at the same path.
    """

    # Actors hash each file from the bytes they decode (see `_EmbedWorker._decode`).
    hashes_what_it_reads = True

    def __init__(
        self,
        spec: ModelSpec,
        *,
        address: str | None = None,
        num_workers: int | None = None,
        batch_size: int = 64,
        device: str = "auto",
        precision: str = "fp32",
        draft_decode: bool = True,
        cpus_per_worker: float | None = None,
        text_embedder: Embedder | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch size must be >= 1")
        check_device_name(device)  # the one list of names (retrieval/device.py)
        if device == "mps":
            raise ValueError("--device mps can't be used on a Ray cluster: use auto, cpu or cuda")
        # Ray gives each actor its GPU: cuda:N names no particular one there
        device = "cuda" if device.startswith("cuda") else device
        # checked here, not only in the actors: a typo fails before the cluster starts
        check_precision(precision)
        self.spec = spec
        self.embed_dim = spec.embed_dim
        self.address = address
        self.num_workers = num_workers
        self.batch_size = int(batch_size)
        self.device = device
        self.precision = precision
        self.draft_decode = draft_decode
        self.cpus_per_worker = cpus_per_worker
        self._text_embedder = text_embedder
        self.started_ray = False
        # What the last run used (actors, CPUs/GPUs each) and the actors' summed busy time.
        self.last_run: dict[str, Any] = {}

    # ---- texts (sidecar captions): few and cheap, so on the driver -------------------------
    @property
    def text_embedder(self) -> Embedder:
        if self._text_embedder is None:
            self._text_embedder = Embedder.from_spec(self.spec, device="cpu", num_workers=0)
        return self._text_embedder

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.text_embedder.embed_texts(texts)

    # ---- images ---------------------------------------------------------------------------
    def _plan(self, n_paths: int) -> dict[str, Any]:
        """Actors and resources per actor for this cluster and this many files."""
        gpus, cpus = cluster_resources()
        use_gpu = self.device == "cuda" or (self.device == "auto" and gpus > 0)
        if use_gpu and gpus == 0:
            raise ValueError("--device cuda was asked for but the Ray cluster has no GPU")
        if use_gpu:
            # Each GPU actor gets its share of the node's CPUs for decoding, up to 8.
            per = self.cpus_per_worker or float(max(1, min(8, cpus // gpus)))
            slots = gpus
        else:
            per = self.cpus_per_worker or 1.0
            slots = max(1, int(cpus // per))
        wanted = self.num_workers or slots
        # No more actors than batches: each actor loads the whole model.
        actors = max(1, min(wanted, math.ceil(n_paths / self.batch_size)))
        return {
            "actors": actors,
            "num_gpus": 1 if use_gpu else 0,
            "num_cpus": per,
            "device": "cuda" if use_gpu else "cpu",
        }

    def _worker_class(self, plan: dict[str, Any]) -> type[_EmbedWorker]:
        config = {
            "spec": self.spec.to_dict(),
            "device": plan["device"],
            "batch_size": self.batch_size,
            "precision": self.precision,
            "draft_decode": self.draft_decode,
            "num_cpus": plan["num_cpus"],
            "decode_threads": max(1, int(plan["num_cpus"])),
        }
        # A subclass per run, so the actor takes no constructor arguments: the config travels
        # with the class (pickled by value, it's small) and the base stays importable.
        return type("_EmbedWorker", (_EmbedWorker,), {"config": config})

    def iter_image_files(
        self, paths: Sequence[str], num_workers: int | None = None
    ) -> Iterator[ImageBatch]:
        """Stream `ImageBatch`es as the actor pool finishes them (any order).

        Files that fail to decode come back as `failures` with the local engine's causes.
        `num_workers` (decode processes of the local engine) has no meaning here: the pool
        size is `self.num_workers` or one actor per GPU (per CPU without GPUs).
        """
        del num_workers
        if not len(paths):
            return
        ray = self._connect()
        plan = self._plan(len(paths))
        self.last_run = dict(plan, images=len(paths))
        # Blocks of whole batches, a few per actor, so that work spreads evenly.
        per_block = math.ceil(len(paths) / (plan["actors"] * 4) / self.batch_size)
        block = max(self.batch_size, min(MAX_BLOCK_ROWS, per_block * self.batch_size))
        dataset = ray.data.from_arrow(path_blocks(paths, block)).map_batches(
            self._worker_class(plan),
            batch_size=self.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_gpus=plan["num_gpus"],
            num_cpus=plan["num_cpus"],
        )
        self.last_run["worker_seconds"] = 0.0
        # e.g. an actor that can't load the model: the weights aren't on its node
        for out in results(dataset, "an embedding actor"):
            self.last_run["worker_seconds"] += float(np.sum(out["seconds"]))
            yield _to_image_batch(out, self.embed_dim)

    def embed_videos(self, names: Sequence[str], every: float,
                     on_frames: Any = None) -> Iterator[tuple[int, Any]]:
        """Videos on the cluster, one per actor task (videos.py): (index into names,
        EmbeddedVideo or VideoError), as they finish."""
        from .videos import embed_videos_on_ray

        yield from embed_videos_on_ray(self, names, every, on_frames)

    def hash_files(self, paths: Sequence[str]) -> Iterator[tuple[int, str | None, str | None]]:
        """The Indexer's `Hasher` on the cluster: new and changed files are read and hashed by
        Ray tasks where they run, so the driver reads no image (a first run of 100M photos
        would otherwise stream every byte through the driver before the actors start).
        Yields (index into paths, hash, None) or (index, None, cause), in any order."""
        if not len(paths):
            return
        ray = self._connect()
        dataset = ray.data.from_arrow(path_blocks(paths, HASH_BLOCK_ROWS)).map_batches(
            _hash_rows, batch_size=HASH_BATCH_ROWS, batch_format="numpy", num_cpus=1
        )
        for out in results(dataset, "a hashing task"):
            for i, digest, cause in zip(out["position"], out["hash"], out["error"], strict=True):
                yield int(i), (str(digest) or None), (str(cause) or None)

    def read_facts(self, paths: Sequence[str]) -> Iterator[tuple[int, ImageFacts]]:
        """The Indexer's `FactsReader` on the cluster: the header facts of an old store's rows
        (its schema upgrade) read by Ray tasks, as `hash_files` reads hashes. Yields (index
        into paths, facts), in any order."""
        if not len(paths):
            return
        ray = self._connect()
        dataset = ray.data.from_arrow(path_blocks(paths, HASH_BLOCK_ROWS)).map_batches(
            _facts_rows, batch_size=HASH_BATCH_ROWS, batch_format="numpy", num_cpus=1
        )
        for out in results(dataset, "a metadata task"):
            for i, facts in zip(out["position"], _facts_of(out["facts"]), strict=True):
                yield int(i), facts

    def _connect(self) -> Any:
        """The `ray` module, connected (started if need be), Ray Data quiet on the console."""
        ray = require_ray()
        self.started_ray = connect(self.address) or self.started_ray
        quiet_ray_data()
        return ray

    def close(self) -> None:
        """Shut Ray down if this embedder started it."""
        if self.started_ray:
            require_ray().shutdown()
            self.started_ray = False


def _hash_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Ray Data task: hash a batch of files. Reading is I/O-bound (network storage, object
    stores), so a few threads per task keep one CPU's worth of hashing busy."""
    paths = [str(p) for p in batch["path"]]
    with ThreadPoolExecutor(HASH_THREADS) as pool:  # the local engine's digest and causes
        answers = list(pool.map(hash_named, paths))
    return {
        "position": np.asarray(batch["position"], np.int64),
        "hash": np.asarray([h or "" for h, _ in answers], dtype=object),
        "error": np.asarray([e or "" for _, e in answers], dtype=object),
    }


def _facts_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Ray Data task: the header facts of a batch of files, on a few threads (I/O)."""
    paths = [str(p) for p in batch["path"]]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        facts = list(pool.map(read_facts, paths))
    return {"position": np.asarray(batch["position"], np.int64), "facts": _facts_column(facts)}


def _facts_column(facts: Sequence[ImageFacts | None]) -> np.ndarray:
    """Facts as one JSON text per row ("" for none): Ray Data's numpy batches carry strings
    well, nullable columns of mixed types less so."""
    return np.asarray([json.dumps(f.to_json()) if f else "" for f in facts], dtype=object)


def _facts_of(column: np.ndarray) -> list[ImageFacts]:
    return [ImageFacts.from_json(json.loads(s)) if s else ImageFacts() for s in map(str, column)]


def _to_image_batch(out: dict[str, np.ndarray], dim: int) -> ImageBatch:
    """An actor's output batch as the local engine's ImageBatch: failed rows as failures."""
    errors = [str(e) for e in out["error"]]
    ok = np.asarray([not e for e in errors], bool)
    positions = out["position"].astype(np.int64)
    embeddings = np.ascontiguousarray(
        np.asarray(out["embedding"], np.float32).reshape(-1, dim)[ok]
    )
    return ImageBatch(
        indices=positions[ok].tolist(),
        embeddings=embeddings,
        sizes=[(int(w), int(h)) for w, h in zip(out["width"][ok], out["height"][ok], strict=True)],
        failures=[(int(p), e) for p, e in zip(positions, errors, strict=True) if e],
        hashes=[str(h) for h in out["hash"][ok]],
        facts=_facts_of(out["facts"][ok]),
    )


__all__ = ["RayEmbedder"]
