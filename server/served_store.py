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

from .batcher import EmbedBatcher
from vqret.retrieval.collection import Collection
from vqret.retrieval.embedder import Embedder
from .inputs import RequestError
from vqret.retrieval.store import STORE_DIRNAME, Store, StoreError, find_store

CATALOG_RECHECK_S = 1.0  # how often a thumbnail/metadata request re-reads the manifest


@dataclass(frozen=True)
class Row:
    id: int
    path: str
    hash: str | None
    width: int | None
    height: int | None


def store_name(collection: Collection) -> str:
    """A store's default name: the folder name of the indexed root (clip's `indice_name`);
    for a store of remote images, the URL's last part (s3://bucket/photos -> photos)."""
    url = collection.store.root_url
    if url is not None:
        return url.rstrip("/").rsplit("/", 1)[-1].rsplit("://", 1)[-1] or collection.store.path.name
    return collection.store.root.name or collection.store.path.name


StoreRef = Collection | str | os.PathLike
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
        if isinstance(item, Collection):
            collection = item
        else:
            store = _open_store(Path(item))
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


def _open_store(path: Path) -> Store:
    if not (path / "manifest.json").is_file() and (path / STORE_DIRNAME).is_dir():
        path = path / STORE_DIRNAME  # the indexed folder was given
    return Store(path)


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
        self._vectors: tuple[int, np.ndarray, np.ndarray] | None = None  # fallback cache

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
            return self._stored_vectors(ids)

    def _stored_vectors(self, ids: Sequence[int]) -> np.ndarray:
        try:
            # The collection's index holds every vector already, exactly when it is flat or
            # HNSW-flat: then no copy is needed. IVF/PQ (lossy or without a direct map) and GPU
            # indexes fall through to the rows, read once per store generation.
            index = self.collection._search_index()
            if _stores_exact_vectors(index):
                return np.stack([index.reconstruct(int(i)) for i in ids]).astype(np.float32)
        except Exception:  # noqa: BLE001 - an index that can't give vectors back: read the rows
            pass
        generation = self.store.generation
        if self._vectors is None or self._vectors[0] != generation:
            all_ids, vectors = self.store.vectors()
            order = np.argsort(all_ids)
            self._vectors = (generation, all_ids[order], vectors[order])
        _, all_ids, vectors = self._vectors
        pos = np.minimum(np.searchsorted(all_ids, ids), max(len(all_ids) - 1, 0))
        if len(all_ids) == 0 or not np.array_equal(all_ids[pos], np.asarray(ids)):
            raise RequestError(404, f"no image with one of the ids {list(ids)} in {self.name!r}")
        return vectors[pos]


    def search_texts(self, vector: np.ndarray, k: int) -> list[tuple[int, float, dict]]:
        """Top-k text rows (captions): (text id, score, {"caption", "image_id", "path"})."""
        with self.search_lock:
            try:
                results = self.collection.search(embedding=vector, k=k, texts=True)
            except TypeError:  # a Collection from before text rows existed
                raise RequestError(400, "this vqret can't search text rows") from None
            except StoreError as e:
                raise RequestError(400, str(e)) from None
        return [
            (r.id, r.score, {"caption": r.text, "image_id": r.image_id, "path": r.path})
            for r in results
        ]


def _stores_exact_vectors(index: Any) -> bool:
    import faiss

    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return isinstance(inner, faiss.IndexFlat | faiss.IndexHNSWFlat)


class _Catalog:
    """id -> row facts of one store generation, in Arrow columns (compact for big stores)."""

    COLUMNS = ["id", "path", "hash", "width", "height"]

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
