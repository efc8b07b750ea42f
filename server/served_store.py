"""The stores a server answers from: opened by name, each with its lock, batcher and catalog.

One Embedder per distinct model (loaded once, whatever the number of stores); each store's
search holds that store's lock, because a Collection reloads its index when the store's
generation changes and two threads must not do that at once. Rows for paths and thumbnails
come from a per-store catalog, re-read only when the store's generation changes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from vqret.api import Collection
from vqret.retrieval.collection import Collection as AnyCollection
from vqret.retrieval.embedder import Embedder
from vqret.retrieval.store import Store, StoreError, find_store

from .batcher import EmbedBatcher
from .inputs import RequestError

CATALOG_RECHECK_S = 1.0  # how often a thumbnail/metadata request re-reads the manifest
GENERATION_MAX_WAITING = 2  # drawings queued behind the running one before 503s
GENERATION_RETRY_AFTER_S = 10


@dataclass(frozen=True)
class Row:
    id: int
    path: str
    hash: str | None
    width: int | None
    height: int | None
    t: float | None = None  # a video's row: the time of the frame it shows


def store_name(collection: Collection) -> str:
    """A store's default name: the folder name of the indexed root (clip's `indice_name`);
    for a store of remote images, the URL's last part (s3://bucket/photos -> photos)."""
    url = collection.store.root_url
    if url is not None:
        return url.rstrip("/").rsplit("/", 1)[-1].rsplit("://", 1)[-1] or collection.store.path.name
    return collection.store.root.name or collection.store.path.name


StoreRef = AnyCollection | str | os.PathLike
StoresArg = Mapping[str, StoreRef] | Sequence[StoreRef | tuple[str | None, StoreRef]] | None


def open_collections(stores: StoresArg, device: str = "auto") -> dict[str, Collection]:
    """Name -> Collection, opening paths with one Embedder per distinct model (loaded once).

    A list item is a store (named by its indexed folder) or a (name, store) pair; two stores
    with the same name are refused. None opens the store found from the current folder up.
    """
    if stores is None:
        found = find_store()
        if found is None:
            raise StoreError(
                "no vqret store in this folder or its parents: pass --store PATH (the indexed "
                "folder or its store)"
            )
        stores = [found]
    if isinstance(stores, Mapping):
        items = list(stores.items())
    else:
        items = [s if isinstance(s, tuple) else (None, s) for s in stores]
    if not items:
        raise StoreError("no stores to serve")
    shared: dict[tuple, Embedder] = {}
    out: dict[str, Collection] = {}
    for name, item in items:
        if isinstance(item, AnyCollection):  # any collection serves; paths open ours
            collection = item
        else:
            store = Store.open(item)
            spec = store.spec
            key = (spec.model, spec.weights_id, spec.embed_dim)
            if key not in shared:
                shared[key] = Embedder.from_spec(spec, device=device, num_workers=0)
            collection = Collection(store, embedder=shared[key])
        name = name or store_name(collection)
        if name in out:
            raise StoreError(
                f"two stores are named {name!r} ({out[name].store.path} and "
                f"{collection.store.path}): name them, e.g. --store {name}-2=PATH"
            )
        out[name] = collection
    return out


class BatcherEmbedder:
    """The engine's QueryEmbedder over a batcher: a query's texts (and its images) go in one
    job, so they share one forward pass, with whatever other queries arrive meanwhile."""

    def __init__(self, batcher: EmbedBatcher):
        self.batcher = batcher
        self.image_size = batcher.embedder.image_size

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.batcher.embed_texts(list(texts))

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        # Preprocessing runs here, in the request's thread; only the model runs in the batcher.
        preprocess = self.batcher.embedder.preprocess
        return self.batcher.embed_pixels_many([preprocess(image) for image in images])


class GenerationQueue:
    """One store's picture drawing: one at a time in its own thread, so a drawing never holds
    the search lock or the batcher, with at most `max_waiting` more queued; beyond that the
    request is answered 503 with Retry-After at once."""

    def __init__(self, name: str, max_waiting: int = GENERATION_MAX_WAITING,
                 retry_after_s: int = GENERATION_RETRY_AFTER_S):
        from concurrent.futures import ThreadPoolExecutor

        self.name = name
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._slots = threading.BoundedSemaphore(max_waiting + 1)  # the running one + waiting
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"vqret-generate-{name}")

    def run(self, draw):
        if not self._slots.acquire(blocking=False):
            raise RequestError(
                503,
                f"the image generator of store {self.name!r} is busy ({self.max_waiting + 1} "
                "drawings running or queued): retry later, or search with generate never",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        try:
            future = self._executor.submit(draw)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ServedStore:
    """A collection plus what serving it needs: its batcher, a search lock, a row catalog."""

    def __init__(self, name: str, collection: Collection, batcher: EmbedBatcher):
        self.name = name
        self.collection = collection
        self.batcher = batcher
        # Re-entrant: a search holds it while it reads stored vectors for deduplication.
        self.search_lock = threading.RLock()
        self._catalog_lock = threading.Lock()
        self._catalog: _Catalog | None = None
        self._checked_at = 0.0
        self.query_embedder = BatcherEmbedder(batcher)
        self.generation = GenerationQueue(name)

    @property
    def store(self) -> Store:
        return self.collection.store

    def summary(self) -> dict[str, Any]:
        spec = self.store.spec
        return {
            "name": self.name,
            "images": len(self.store),
            "texts": text_rows(self.store),
            "model": spec.model,
            "pretrained": spec.weights_id,
            "dim": self.store.dim,
            "generation": self.store.generation,
        }

    # ---- rows -----------------------------------------------------------------------------
    def catalog(self) -> _Catalog:
        with self._catalog_lock:
            now = time.monotonic()
            if self._catalog is None or now - self._checked_at > CATALOG_RECHECK_S:
                self.store.refresh()  # another process may have indexed since
                self._checked_at = now
                if self._catalog is None or self._catalog.generation != self.store.generation:
                    self._catalog = _Catalog.read(self.store)
            return self._catalog

    def row(self, image_id: int) -> Row:
        row = self.catalog().get(image_id)
        if row is None:
            raise RequestError(404, f"no image with id {image_id} in store {self.name!r}")
        return row

    def original_path(self, image_id: int) -> Path | str:
        """The file of an indexed image, or its URL in a store of remote images. Only stored
        paths reach the file system (or the object store)."""
        row = self.row(image_id)
        url = self.store.root_url
        if url is not None:
            # rows keep full URLs; one outside the indexed prefix never came from an index run
            if not row.path.startswith(url.rstrip("/") + "/") or "/../" in row.path:
                raise RequestError(404, f"no image with id {image_id} in store {self.name!r}")
            return row.path
        rel = PurePosixPath(row.path)
        if rel.is_absolute() or ".." in rel.parts:
            raise RequestError(404, f"no image with id {image_id} in store {self.name!r}")
        path = self.store.root / rel
        if not path.is_file():
            raise RequestError(404, f"image {image_id} ({row.path}) is gone from the disk")
        return path

    def stored_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), D) stored embeddings of indexed images (for dedup, more like this)."""
        with self.search_lock:
            return self.collection.stored_vectors(ids)

    def generate_on_miss(self, collection, query, vector, hits):
        """The engine's fallback, drawing in this store's own worker, one at a time."""
        from vqret.diffusion.fallback import generate_on_miss

        return generate_on_miss(collection, query, vector, hits, run=self.generation.run)


class _Catalog:
    """id -> row facts of one store generation, in Arrow columns (compact for big stores)."""

    COLUMNS = ["id", "path", "hash", "width", "height", "t"]

    def __init__(self, generation: int, table: pa.Table):
        self.generation = generation
        table = table.take(pc.sort_indices(table, [("id", "ascending")]))
        self._ids = table.column("id").to_numpy()
        self._table = table

    @classmethod
    def read(cls, store: Store) -> _Catalog:
        return cls(store.generation, store.read_table(cls.COLUMNS))

    def get(self, image_id: int) -> Row | None:
        pos = int(np.searchsorted(self._ids, image_id))
        if pos >= len(self._ids) or self._ids[pos] != image_id:
            return None
        values = {c: self._table.column(c)[pos].as_py() for c in self.COLUMNS}
        return Row(**values)


def text_rows(store: Store) -> int:
    """Texts (captions) in the store; 0 where this store version has no text table."""
    count = getattr(store, "count", None)
    if count is None:
        return 0
    try:
        return int(count("texts"))
    except (KeyError, TypeError, ValueError):
        return 0
