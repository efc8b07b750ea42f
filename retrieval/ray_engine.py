"""Scale out on Ray: embed through a Ray Data actor pool, build big IVF indexes shard by shard.

`vqret index SOURCE --engine ray` runs the same `Indexer` as the local engine; only the two
steps that read images move to the cluster. `RayEmbedder.iter_image_files` has the interface
of `Embedder.iter_image_files` (a list of files in, `ImageBatch`es out, in any order, failures
as data) and `RayEmbedder.hash_files` that of the Indexer's `Hasher`, so the incremental rules,
ids, commits and failure reports are the local engine's by construction:

    driver: walk (size, mtime) ->  Ray tasks: hash new and changed files  ->  driver: plan
        ->  Ray Data: (position, path) blocks  ->  map_batches(_EmbedWorker, actor pool:
            model loaded once per actor, 1 GPU each when the cluster has GPUs)
        ->  iter_batches on the driver  ->  Indexer commits

The driver reads no image. On an incremental run a new or changed file is read twice, both
times on the cluster: once to hash it (the plan needs its hash to recognise renames and copies
before anything is embedded) and once to embed it. A first run has nothing to recognise, so
the actors hash the bytes they read to embed (`hashes_what_it_reads`): one read per file.

Results stream back as actors finish batches (no materialisation), so the driver commits
while the cluster keeps embedding, and a killed run loses at most what wasn't committed.

`build_sharded_index` is the index side: train the IVF quantizer on a sample, add the
vectors of the store's Parquet parts shard by shard in parallel Ray tasks, merge the shards'
inverted lists into one index. No process ever holds all the raw vectors.

Ray is an optional extra (`pip install 'vqret[ray]'`): nothing here imports it at module
level, so the CLI can import this module to say how to install it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import ann
from .content_hash import stream_hash, unreadable
from .embedder import Embedder, ImageBatch, ModelSpec, _ImageFiles, check_precision
from .hasher import hash_named
from .index import index_files, load_saved, read_meta, save_index, update_after_write, update_index
from .indexer import IndexReport, index_folder
from .one_line import first_line
from .remote import FsspecSource, is_url  # noqa: F401 - FsspecSource: re-exported
from .remote import read_bytes as _read_bytes
from .remote import version_ns as _version_ns  # noqa: F401 - the name tests and notes use
from .store import IMAGES, Store, StoreWriter, embeddings_from_arrow, write_atomic

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vqret[ray]'"
# Below this many rows one process trains and fills an IVF index in minutes; a cluster job
# (start-up, shipping shards) would cost more than it saves.
SHARDED_ABOVE = 2_000_000
# Rows per (position, path) block handed to the actor pool: large enough that per-block
# scheduling overhead is noise at 100M images, small enough that blocks spread over actors.
MAX_BLOCK_ROWS = 4096
# Rows per commit (the Indexer also commits every 30 s). Each commit writes a Parquet part and
# rewrites the manifest, which lists every part: at the local engine's 512 rows, a cluster
# embedding thousands of images a second would write 200k parts for 100M images, and a
# manifest that grows with each of them.
COMMIT_ROWS = 65536
# Hashing: files per Ray Data block and per task call, and reading threads per task.
HASH_BLOCK_ROWS = 1024
HASH_BATCH_ROWS = 256
HASH_THREADS = 4


class RayUnavailableError(RuntimeError):
    """`--engine ray` was asked for, but ray (with Ray Data) isn't installed."""


def require_ray() -> Any:
    """The `ray` module with Ray Data, or RayUnavailableError with the one-line install hint."""
    try:
        import ray
        import ray.data  # noqa: F401 - `ray` without the [data] extra lacks it
    except ImportError:
        raise RayUnavailableError(
            f"--engine ray needs Ray with Ray Data: {INSTALL_HINT}"
        ) from None
    return ray


class RayWorkerError(ValueError):
    """A Ray actor or task failed as a whole (not one file): its cause in one line."""


_ERROR_LINE = re.compile(r"^([\w.]*(?:Error|Exception)):\s*(.+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _worker_failure(error: Exception, what: str) -> Exception:
    """Ray's error for a dead actor or failed task is its whole remote traceback; keep the
    exception it ends with (e.g. `WeightsUnavailableError: weights file not found: ...`).
    Errors that aren't Ray's (Ray Data's user-code wrapper included) are left as they are."""
    if not type(error).__module__.startswith("ray"):
        return error
    lines = _ANSI.sub("", str(error)).splitlines()
    found = [m for m in map(_ERROR_LINE.match, (ln.strip() for ln in lines)) if m]
    cause = (f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2)}" if found
             else (lines[0] if lines else type(error).__name__))
    return RayWorkerError(
        f"{what} failed on Ray: {cause} (workers' logs: /tmp/ray/session_latest/logs)"
    )


class ClusterUnreachableError(ValueError):
    """`--address` names no Ray cluster that answers (a ValueError: the CLI's one line)."""


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at `address` ("auto", "HOST:6379", "ray://HOST:10001"), or start
    a local one.

    Returns True when this call started Ray (so the caller may shut it down). An already
    initialised Ray (a test, a notebook, a Ray job's driver) is used as it is.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    _check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            # The workers' output stays in their logs (/tmp/ray/session_latest/logs on each
            # node): forwarded, a failing actor's remote traceback would bury the one-line
            # error the run ends with.
            log_to_driver=False,
        )
    except ConnectionError as e:  # "auto" with no cluster running on this machine
        raise ClusterUnreachableError(f"Ray cluster {address}: {first_line(e)}") from None
    return True


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds, in one line, when nothing listens at HOST:PORT: Ray itself retries
    an unreachable GCS for minutes, logging a warning every few seconds."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachableError(
            f"Ray cluster {address}: expected auto, HOST:PORT or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        cause = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ClusterUnreachableError(
            f"Ray cluster {address}: nothing answers there ({cause}); start one with "
            "`ray start --head`, or leave --address out to start Ray on this machine"
        ) from None


# --------------------------------------------------------------------------------------------
# Embedding on Ray Data
# --------------------------------------------------------------------------------------------


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

    def _decode(self, path: str) -> tuple[Any, tuple[int, int], str | None, str]:
        """(pixels, size, failure cause, content hash): each file is read once, into memory,
        and hashed there, so a first run needs no separate hash pass."""
        try:
            data = _read_bytes(path) if is_url(path) else Path(path).read_bytes()
        except OSError as err:
            return None, (0, 0), unreadable(err), ""
        # The local engine's own per-file decode: same loader, draft size, transform, causes.
        _, pixels, size, cause = _ImageFiles([data], self.embedder.preprocess, self.draft)[0]
        return pixels, size, cause, stream_hash(io.BytesIO(data))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        started = time.perf_counter()
        paths = [str(p) for p in batch["path"]]
        decoded = list(self.pool.map(self._decode, paths) if self.pool else map(
            self._decode, paths))
        good = [i for i, (pixels, *_) in enumerate(decoded) if pixels is not None]
        dim = self.embedder.embed_dim
        embeddings = np.zeros((len(paths), dim), np.float32)
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
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
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
        ray = require_ray()
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
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
        dataset = ray.data.from_arrow(_path_blocks(paths, block)).map_batches(
            self._worker_class(plan),
            batch_size=self.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_gpus=plan["num_gpus"],
            num_cpus=plan["num_cpus"],
        )
        self.last_run["worker_seconds"] = 0.0
        # e.g. an actor that can't load the model: the weights aren't on its node
        for out in _results(dataset, "an embedding actor"):
            self.last_run["worker_seconds"] += float(np.sum(out["seconds"]))
            yield _to_image_batch(out, self.embed_dim)

    def hash_files(self, paths: Sequence[str]) -> Iterator[tuple[int, str | None, str | None]]:
        """The Indexer's `Hasher` on the cluster: new and changed files are read and hashed by
        Ray tasks where they run, so the driver reads no image (a first run of 100M photos
        would otherwise stream every byte through the driver before the actors start).
        Yields (index into paths, hash, None) or (index, None, cause), in any order."""
        if not len(paths):
            return
        ray = self._connect()
        dataset = ray.data.from_arrow(_path_blocks(paths, HASH_BLOCK_ROWS)).map_batches(
            _hash_rows, batch_size=HASH_BATCH_ROWS, batch_format="numpy", num_cpus=1
        )
        for out in _results(dataset, "a hashing task"):
            for i, digest, cause in zip(out["position"], out["hash"], out["error"], strict=True):
                yield int(i), (str(digest) or None), (str(cause) or None)

    def _connect(self) -> Any:
        """The `ray` module, connected (started if need be), Ray Data quiet on the console."""
        ray = require_ray()
        self.started_ray = connect(self.address) or self.started_ray
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the caller shows its own progress
        _quiet_ray_data_console()
        return ray

    def close(self) -> None:
        """Shut Ray down if this embedder started it."""
        if self.started_ray:
            require_ray().shutdown()
            self.started_ray = False


def _results(dataset: Any, what: str) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's output batches as they finish; a worker that fails as a whole (not one
    file) ends the run with its cause in one line."""
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy",
                                        prefetch_batches=2))
    while True:
        try:
            out = next(batches, None)
        except Exception as e:
            raise _worker_failure(e, what) from e
        if out is None:
            return
        yield out


def _path_blocks(paths: Sequence[str], rows: int) -> list[Any]:
    """`(position, path)` Arrow tables of `rows` rows each: what Ray Data hands out."""
    import pyarrow as pa

    return [
        pa.table(
            {
                "position": pa.array(range(start, min(start + rows, len(paths))), pa.int64()),
                "path": pa.array([str(p) for p in paths[start : start + rows]], pa.string()),
            }
        )
        for start in range(0, len(paths), rows)
    ]


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


class _NoRunChatter(logging.Filter):
    """Drops Ray Data's per-run INFO lines (plan, start, finish) and its note that progress
    bars are off: on stderr they would interleave with vqret's progress and summary. Its
    session log file (/tmp/ray/session_*/logs/ray-data) keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO and "Progress bars disabled" not in str(record.msg)


def _quiet_ray_data_console() -> None:
    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler)
        if console and not any(isinstance(f, _NoRunChatter) for f in handler.filters):
            handler.addFilter(_NoRunChatter())


def _to_image_batch(out: dict[str, np.ndarray], dim: int) -> ImageBatch:
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
    )


def index_folder_with_ray(
    store: Store,
    spec: ModelSpec,
    folder: Path | str,
    address: str | None = None,
    *,
    wait: float = 0,
    num_workers: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "fp32",
    text_embedder: Embedder | None = None,
    **indexer_kwargs: Any,
) -> IndexReport:
    """`index_folder`, with the images embedded on Ray (local Ray when `address` is None).

    Everything but the model step is the local engine's `Indexer`; `indexer_kwargs` are its
    options (commit_every, on_progress, on_failure, index_kind, ...). `folder` may be an
    fsspec URL (rows then keep each object's URL). Ray is shut down at the end only if this
    call started it.
    """
    require_ray()
    embedder = RayEmbedder(
        spec,
        address=address,
        num_workers=num_workers,
        batch_size=batch_size,
        device=device,
        precision=precision,
        text_embedder=text_embedder,
    )
    # A URL is listed through fsspec on the driver (index_folder gives the Indexer its source)
    for name, value in indexer_options(embedder).items():
        indexer_kwargs.setdefault(name, value)
    try:
        return index_folder(store, embedder, folder, wait=wait, **indexer_kwargs)
    finally:
        embedder.close()


def indexer_options(embedder: RayEmbedder) -> dict[str, Any]:
    """What the Ray engine changes in the local engine's `Indexer`: new files are hashed on
    the cluster, commits are bigger, and big collections build their IVF index in parallel
    tasks too."""
    return {
        "hasher": embedder.hash_files,
        "commit_every": COMMIT_ROWS,
        "index_updater": ray_update_after_write,
    }


# --------------------------------------------------------------------------------------------
# Index building for large collections
# --------------------------------------------------------------------------------------------


def _part_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _iter_part_vectors(
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
    for ids, vectors in _iter_part_vectors(paths, dim):
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
    for ids, vectors in _iter_part_vectors(paths, dim):
        index.add_with_ids(vectors, ids)
        rows += len(ids)
        if len(queries):
            scores, pos = faiss.knn(queries, vectors, min(k, len(vectors)),
                                    metric=faiss.METRIC_INNER_PRODUCT)
            best_scores, best_ids = _merge_topk(best_scores, best_ids, scores, ids[pos], k)
    faiss.write_index(index, out)
    return {
        "index": out,
        "scores": best_scores,
        "ids": best_ids,
        "rows": rows,
    }


def _merge_topk(
    scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
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
    import faiss

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
    sample_task = ray.remote(num_cpus=1)(_sample_rows)
    rng = np.random.default_rng(seed)
    refs = [
        sample_task.remote(s, dim, q, int(rng.integers(1 << 31)))
        for s, q in zip(shards, _proportional(want, rows), strict=True)
        if q
    ]
    drawn = ray.get(refs)
    sample_ids = np.concatenate([d[0] for d in drawn])
    sample = np.concatenate([d[1] for d in drawn])
    pick = np.sort(rng.choice(len(sample), min(n_queries, len(sample)), replace=False))
    queries = np.ascontiguousarray(sample[pick], np.float32)
    query_ids = sample_ids[pick]

    if trained is None:
        # ann.build_index with no ids only trains: the same factory settings (k-means and OPQ
        # iterations, training-set size) as the in-process build, by construction.
        trained = ann.build_index(plan, np.zeros(0, np.int64), sample)
        plan.trained_n = n
    del sample, drawn
    trained_ref = ray.put(faiss.serialize_index(trained))
    queries_ref = ray.put(queries)
    # The queries are members of the collection: k+1 neighbours, then each drops itself.
    k = min(10, n - 1) + 1
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
            truth_scores, truth_ids = _merge_topk(
                truth_scores, truth_ids, result["scores"], result["ids"], k
            )
            del shard, result
    finally:
        for out in outs:  # a failed task's, or those a failure left unmerged
            Path(out).unlink(missing_ok=True)
    if merged is None or merged.ntotal != n:
        raise RuntimeError(f"sharded build: {0 if merged is None else merged.ntotal} of {n} "
                           "vectors after merging; the store changed underneath?")
    tune_with_truth(merged, plan, queries, query_ids, truth_ids, target)
    save_index(store, merged, table, plan)
    # What update_index records too: the type asked for, kept by later runs without --index.
    meta = read_meta(store, table) or {}
    meta["asked"] = kind
    write_atomic(index_files(store, table)[1], json.dumps(meta, indent=2).encode())
    log.info("sharded %s: %d rows in %d shards, %.1f s", plan.factory, n, len(shards),
             time.perf_counter() - started)
    return plan


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


def _without_self(neighbours: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k neighbours other than the query itself (leave-one-out)."""
    return np.stack([row[row != me][:k] for row, me in zip(neighbours, own, strict=True)])


def tune_with_truth(
    index: Any,
    plan: ann.IndexPlan,
    queries: np.ndarray,
    query_ids: np.ndarray,
    truth: np.ndarray,
    target: float,
) -> ann.IndexPlan:
    """`ann.tune`, with the exact top-(k+1) given (computed shard by shard) instead of
    computed here from all vectors. The queries are collection members held out of their own
    results, so the recall is what a query from outside the collection gets."""
    if not len(queries):
        plan.params, plan.recall_at_10 = {}, None
        return plan
    k = truth.shape[1] - 1
    truth = _without_self(truth, query_ids, k)
    values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v <= plan.nlist]
    values = values or [plan.nlist]
    recall = 0.0
    for value in values:
        ann.set_search_params(index, {"nprobe": value})
        found = _without_self(index.search(queries, k + 1)[1], query_ids, k)
        recall = ann.recall_vs_exact(found, truth)
        if recall >= target:
            break
    plan.params = {"nprobe": value}
    plan.recall_at_10 = round(recall, 4)
    plan.query_ms = round(ann.single_query_ms(index, queries[:50], k), 3)
    return plan


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
    if meta is not None and meta.get("generation") == store.table_generation(table):
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
    "INSTALL_HINT",
    "ClusterUnreachableError",
    "FsspecSource",
    "RayEmbedder",
    "RayUnavailableError",
    "RayWorkerError",
    "build_sharded_index",
    "connect",
    "index_folder_with_ray",
    "indexer_options",
    "merge_into",
    "ray_update_after_write",
    "ray_update_index",
    "require_ray",
]
