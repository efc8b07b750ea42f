"""What `vqret serve` does, without HTTP: stores by name, queries to vectors, vectors to hits.

The HTTP layer (server.py) only parses requests and shapes responses; everything that touches
a model, an index or a file is here, so it can be used and tested without a server.

Thread safety: requests run in a thread pool. Model calls go through one EmbedBatcher per
model (one thread, queries that arrive together share a forward pass); each store's search
holds that store's lock, because a Collection reloads its index when the store's generation
changes and two threads must not do that at once. Rows for paths and thumbnails come from a
per-store catalog, re-read only when the store's generation changes.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .batcher import EmbedBatcher
from .collection import Collection
from .embedder import Embedder
from .images import ImageLoadError, load_image
from .store import STORE_DIRNAME, Store, StoreError, find_store
from .thumbnails import THUMB_SIZE, ThumbnailCache, make_thumbnail

# clip-retrieval's deduplicate: a result this close (cosine) to a better one is a duplicate.
DEDUP_THRESHOLD = 0.94
MAX_TEXT_CHARS = 1000  # CLIP reads 77 tokens; anything far longer is a mistake or abuse
MAX_QUERY_PIXELS = 50_000_000  # query images: well above any camera, far below a bomb
CATALOG_RECHECK_S = 1.0  # how often a thumbnail/metadata request re-reads the manifest


class RequestError(Exception):
    """A bad request: becomes an HTTP status and a one-line JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    id: int
    path: str  # as stored: relative to the indexed folder
    score: float  # cosine similarity


@dataclass(frozen=True)
class Row:
    id: int
    path: str
    hash: str | None
    width: int | None
    height: int | None


@dataclass(frozen=True)
class Query:
    """A query turned into a vector, and what to say about it in the response."""

    vector: np.ndarray  # (D,) float32, L2-normalised
    description: dict[str, Any]
    exclude_id: int | None = None  # "more like this": the image itself is not a result


# --------------------------------------------------------------------------------------------
# Opening stores
# --------------------------------------------------------------------------------------------


def store_name(collection: Collection) -> str:
    """A store's default name: the folder name of the indexed root (clip's `indice_name`)."""
    return collection.store.root.name or collection.store.path.name


def open_collections(
    stores: Mapping[str, Collection | str | os.PathLike] | Sequence[Collection | str | os.PathLike]
    | None,
    device: str = "auto",
) -> dict[str, Collection]:
    """Name -> Collection, opening paths with one Embedder per distinct model (loaded once).

    A list is named by each store's indexed folder; two stores with the same name are refused
    (pass a mapping to name them). None opens the store found from the current folder up.
    """
    if stores is None:
        found = find_store()
        if found is None:
            raise StoreError(
                "no vqret store in this folder or its parents: pass --store PATH (the indexed "
                "folder or its store)"
            )
        stores = [found]
    items = list(stores.items()) if isinstance(stores, Mapping) else [(None, s) for s in stores]
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


# --------------------------------------------------------------------------------------------
# One served store
# --------------------------------------------------------------------------------------------


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

    def original_path(self, image_id: int) -> Path:
        """The file of an indexed image. Only stored paths reach the file system."""
        row = self.row(image_id)
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


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


class SearchService:
    """Stores by name, each with its model loaded once, answering queries from any thread."""

    def __init__(
        self,
        collections: Mapping[str, Collection],
        *,
        max_k: int = 1000,
        max_query_pixels: int = MAX_QUERY_PIXELS,
        thumbnail_cache_bytes: int = 64 << 20,
        allow_url_queries: bool = False,
        url_max_bytes: int = 10 << 20,
        url_timeout_s: float = 5.0,
        warm: bool = True,
    ):
        if not collections:
            raise StoreError("no stores to serve")
        self.max_k = max_k
        self.allow_url_queries = allow_url_queries
        self.url_max_bytes = url_max_bytes
        self.url_timeout_s = url_timeout_s
        self.max_query_pixels = max_query_pixels
        self.thumbnails = ThumbnailCache(thumbnail_cache_bytes)
        batchers: dict[int, EmbedBatcher] = {}
        self.stores: dict[str, ServedStore] = {}
        for name, collection in collections.items():
            embedder = collection.embedder  # loads the model now, not on the first request
            batcher = batchers.setdefault(id(embedder), EmbedBatcher(embedder))
            self.stores[name] = ServedStore(name, collection, batcher)
        self._batchers = list(batchers.values())
        if warm:
            self.warm_up()

    def warm_up(self) -> None:
        """Run the model and each index once, so the first user doesn't pay for it."""
        for batcher in self._batchers:
            batcher.embed_text("warm-up")
        for served in self.stores.values():
            served.catalog()
            try:
                served.collection.search(embedding=np.zeros(served.store.dim, np.float32), k=1)
            except StoreError:
                pass  # an empty store: nothing to warm

    def close(self) -> None:
        for batcher in self._batchers:
            batcher.close()

    # ---- lookup ---------------------------------------------------------------------------
    def get(self, name: Any) -> ServedStore:
        """A store by name; with one store, no name means that one."""
        if name is None or name == "":
            if len(self.stores) == 1:
                return next(iter(self.stores.values()))
            raise RequestError(400, f"several stores are served: name one of {self.names()}")
        if not isinstance(name, str) or name not in self.stores:
            raise RequestError(404, f"unknown store {name!r}: this server has {self.names()}")
        return self.stores[name]

    def names(self) -> list[str]:
        return list(self.stores)

    # ---- queries -> vectors ---------------------------------------------------------------
    def query(
        self,
        served: ServedStore,
        *,
        text: Any = None,
        image: bytes | None = None,
        image_base64: Any = None,
        like: Any = None,
        embedding: Any = None,
        image_url: Any = None,
        labels: Mapping[str, str] | None = None,
    ) -> Query:
        """Exactly one query input -> its normalised vector. Bad input raises RequestError.

        `labels` renames inputs in error messages (clip-retrieval says `embedding_input`).
        """
        labels = labels or {}
        given = {
            "text": text,
            "image": image if image is not None else image_base64,
            "like": like,
            "embedding": embedding,
            "image_url": image_url,
        }
        # null and "" mean "not given": clip-retrieval's front sends every field, most null.
        present = [k for k, v in given.items() if v is not None and v != ""]
        if not present:
            if text is not None:
                raise RequestError(400, "empty query: give some text to search for")
            names = ", ".join(labels.get(k, k) for k in given)
            raise RequestError(400, f"no query: give one of {names}")
        if len(present) > 1:
            names = " and ".join(labels.get(k, k) for k in present)
            raise RequestError(400, f"give exactly one query input, not {names}")
        kind = present[0]
        if kind == "text":
            return Query(self.embed_text(served, text), {"type": "text", "text": text})
        if kind == "image":
            data = image if image is not None else decode_base64(image_base64, "image")
            return Query(self.embed_image(served, data), {"type": "image"})
        if kind == "image_url":
            data = self.fetch_image_url(image_url)
            return Query(self.embed_image(served, data), {"type": "image_url", "url": image_url})
        if kind == "like":
            image_id = parse_int(like, "like", minimum=0)
            served.row(image_id)  # 404 for an unknown id
            vector = normalise(served.stored_vectors([image_id])[0], "like")
            return Query(vector, {"type": "like", "id": image_id}, exclude_id=image_id)
        vector = self.parse_embedding(served, embedding, labels.get("embedding", "embedding"))
        return Query(vector, {"type": "embedding"})

    def embed_text(self, served: ServedStore, text: Any) -> np.ndarray:
        if not isinstance(text, str):
            raise RequestError(400, "text must be a string")
        if not text.strip():
            raise RequestError(400, "empty query: give some text to search for")
        if len(text) > MAX_TEXT_CHARS:
            raise RequestError(400, f"text is longer than {MAX_TEXT_CHARS} characters")
        return served.batcher.embed_text(text)

    def embed_image(self, served: ServedStore, data: bytes) -> np.ndarray:
        if not data:
            raise RequestError(400, "the image is empty (0 bytes)")
        embedder = served.batcher.embedder
        size = embedder.image_size
        try:
            image = load_image(data, max_pixels=self.max_query_pixels, draft_size=(size, size))
        except ImageLoadError as e:
            raise RequestError(400, f"not an image this server can read: {e.cause}") from None
        # Preprocessing runs here, in the request's thread; only the model runs in the batcher.
        return served.batcher.embed_pixels(embedder.preprocess(image))

    def fetch_image_url(self, url: Any) -> bytes:
        """The bytes at an http(s) URL, within the size and time caps; off unless allowed."""
        if not self.allow_url_queries:
            raise RequestError(
                403,
                "image_url queries are disabled: this server doesn't fetch URLs unless started "
                "with --allow-url-queries; send the image itself (base64 `image`) instead",
            )
        if not isinstance(url, str):
            raise RequestError(400, "image_url must be a string")
        return fetch_url(url, max_bytes=self.url_max_bytes, timeout_s=self.url_timeout_s)

    def parse_embedding(self, served: ServedStore, value: Any, what: str) -> np.ndarray:
        dim = served.store.dim
        if not isinstance(value, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        ):
            raise RequestError(400, f"{what} must be a list of numbers")
        if len(value) != dim:
            raise RequestError(400, f"{what} has {len(value)} numbers; this store has {dim}")
        return normalise(np.asarray(value, np.float64), what)

    # ---- vectors -> hits ------------------------------------------------------------------
    def search(
        self,
        served: ServedStore,
        query: Query,
        k: int,
        *,
        fetch: int | None = None,
        deduplicate: bool = False,
    ) -> list[Hit]:
        """Top `k` hits; `fetch` (>= k) are retrieved first, then filtered (dedup, self)."""
        fetch = max(k, fetch or k) + (1 if query.exclude_id is not None else 0)
        with served.search_lock:
            try:
                results = served.collection.search(embedding=query.vector, k=fetch)
            except StoreError as e:
                if len(served.store) == 0:
                    return []  # an empty store answers nothing, not an error
                raise RequestError(503, str(e)) from None
            if query.exclude_id is not None:
                results = [r for r in results if r.id != query.exclude_id]
            if deduplicate and len(results) > 1:
                vectors = served.stored_vectors([r.id for r in results])
                results = [r for r, keep in zip(results, unique_mask(vectors), strict=True) if keep]
        return [Hit(rank, r.id, r.path, r.score) for rank, r in enumerate(results[:k], start=1)]

    def thumbnail(self, served: ServedStore, image_id: int) -> tuple[bytes, str]:
        """(JPEG bytes, ETag) of an indexed image's thumbnail."""
        row = served.row(image_id)
        path = served.original_path(image_id)
        key = (served.name, image_id, row.hash, THUMB_SIZE)
        try:
            data = self.thumbnails.get_or_make(key, lambda: make_thumbnail(path))
        except ImageLoadError as e:
            raise RequestError(404, f"image {image_id} no longer decodes: {e.cause}") from None
        return data, f'"t{image_id}-{row.hash or "x"}"'


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def fetch_url(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """GET an http(s) URL: at most `max_bytes`, about `timeout_s` in all, 3 redirects."""
    import httpx

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RequestError(400, "image_url must be an http:// or https:// URL")
    deadline = time.monotonic() + timeout_s
    # trust_env=False: a server-side fetch must not pick up whatever proxy the shell had.
    client = httpx.Client(
        follow_redirects=True, max_redirects=3, timeout=timeout_s, trust_env=False
    )
    try:
        with client, client.stream("GET", url, headers={"Accept": "image/*"}) as response:
            if response.status_code != 200:
                raise RequestError(400, f"image_url answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise RequestError(413, f"image_url is larger than {max_bytes} bytes")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(413, f"image_url is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise RequestError(400, f"image_url took longer than {timeout_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise RequestError(400, f"image_url took longer than {timeout_s:g} s") from None
    except httpx.HTTPError as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RequestError(400, f"couldn't fetch image_url: {detail}") from None


def unique_mask(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Rank-ordered (N, D) normalised vectors -> keep[N]: False where a better one is >= t."""
    sims = vectors @ vectors.T  # (N, N) cosine
    better = np.tril(sims >= threshold, k=-1)  # [i, j] for j < i: j ranks above i
    return ~better.any(axis=1)


def normalise(vector: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise RequestError(400, f"{what} must be a finite, non-zero vector")
    return (vector / norm).astype(np.float32)


def decode_base64(value: Any, what: str) -> bytes:
    """Base64 image bytes; a `data:image/...;base64,` prefix (as browsers make) is allowed."""
    if not isinstance(value, str):
        raise RequestError(400, f"{what} must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{what} is not valid base64") from None


def parse_int(value: Any, what: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """An int from JSON or a form field, in range; anything else is a 400."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(400, f"{what} must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        top = f"..{maximum}" if maximum is not None else " or more"
        raise RequestError(400, f"{what} must be in {minimum}{top}, not {value}")
    return value
