"""What `vqret serve` does, without HTTP: queries to vectors, vectors to hits.

The HTTP layer (server.py) only parses requests and shapes responses; everything that touches
a model, an index or a file is here or in served_store.py, so it can be used and tested
without a server. Requests run in a thread pool: model calls go through one EmbedBatcher per
model (one thread; queries that arrive together share a forward pass), searches hold their
store's lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batcher import EmbedBatcher
from vqret.retrieval.collection import Collection
from vqret.retrieval.images import ImageLoadError, load_image
from .inputs import RequestError, decode_base64, fetch_url, normalise, parse_int
from .served_store import ServedStore
from vqret.retrieval.store import StoreError
from .thumbnails import THUMB_SIZE, ThumbnailCache, make_thumbnail

# clip-retrieval's deduplicate: a result this close (cosine) to a better one is a duplicate.
DEDUP_THRESHOLD = 0.94
MAX_TEXT_CHARS = 1000  # CLIP reads 77 tokens; anything far longer is a mistake or abuse
MAX_QUERY_PIXELS = 50_000_000  # query images: well above any camera, far below a bomb
RENDITION_SIZE = 2048  # px, longest side of the JPEG shown for TIFF, HEIC, ...


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    id: int
    path: str  # as stored: relative to the indexed folder
    score: float  # cosine similarity


@dataclass(frozen=True)
class Query:
    """A query turned into a vector, and what to say about it in the response."""

    vector: np.ndarray  # (D,) float32, L2-normalised
    description: dict[str, Any]
    exclude_id: int | None = None  # "more like this": the image itself is not a result


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

    def rendition(self, served: ServedStore, image_id: int) -> bytes:
        """A large JPEG of an indexed image, for formats browsers can't show (TIFF, HEIC)."""
        try:
            return make_thumbnail(served.original_path(image_id), RENDITION_SIZE)
        except ImageLoadError as e:
            raise RequestError(404, f"image {image_id} no longer decodes: {e.cause}") from None

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


def unique_mask(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Rank-ordered (N, D) normalised vectors -> keep[N]: False where a better one is >= t."""
    sims = vectors @ vectors.T  # (N, N) cosine
    better = np.tril(sims >= threshold, k=-1)  # [i, j] for j < i: j ranks above i
    return ~better.any(axis=1)
