"""What `vqret serve` does, without HTTP: requests to engine queries, and files by id.

The HTTP layer (app.py) only parses requests and shapes responses; requests become Queries
here and run through the one query engine (vqret.retrieval.engine) like every other surface's;
what serving adds (the batcher, the store lock, the generation queue) is in served_store.py.
Requests run in a thread pool: model calls go through one EmbedBatcher per model (one thread;
queries that arrive together share a forward pass), searches hold their store's lock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from vqret.retrieval.collection import Collection
from vqret.retrieval.engine import MAX_QUERY_PIXELS, SearchResults, run_query
from vqret.retrieval.fetch import fetch_url
from vqret.retrieval.images import ImageLoadError
from vqret.retrieval.query import (
    EMBEDDING,
    IMAGE,
    IMAGE_URL,
    LIKE,
    TEXT,
    TEXTS,
    Query,
    Term,
    parse_terms,
)
from vqret.retrieval.store import StoreError

from .batcher import EmbedBatcher
from .decode_budget import PixelBudget, default_budget_mp
from .inputs import RequestError, decode_base64, parse_int
from .served_store import ServedStore
from .thumbnails import THUMB_SIZE, ThumbnailCache, make_thumbnail, make_video_thumbnail

URLS_DISABLED = (
    "image_url queries are disabled: this server doesn't fetch URLs unless started with "
    "--allow-url-queries; send the image itself (base64 `image`) instead"
)
RENDITION_SIZE = 2048  # px, longest side of the JPEG shown for TIFF, HEIC, ...


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    id: int
    path: str  # as stored: relative to the indexed folder
    score: float  # cosine similarity


# query input -> its request field; a request gives exactly one
OWN_INPUTS = {k: k for k in ("q", "terms", "text", "image", "image_url", "like", "embedding")}


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
        decode_budget: PixelBudget | None = None,
        warm: bool = True,
    ):
        if not collections:
            raise StoreError("no stores to serve")
        self.max_k = max_k
        self.allow_url_queries = allow_url_queries
        self.url_max_bytes = url_max_bytes
        self.url_timeout_s = url_timeout_s
        self.max_query_pixels = max_query_pixels
        # query images of every request and store decode under this one budget of pixels
        self.decode_budget = decode_budget or PixelBudget(default_budget_mp() * 1_000_000)
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
                served.collection.nearest(np.zeros(served.store.dim, np.float32), 1)
            except StoreError:
                pass  # an empty store: nothing to warm

    def close(self) -> None:
        for batcher in self._batchers:
            batcher.close()
        for served in self.stores.values():
            served.generation.close()

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

    # ---- requests -> queries -------------------------------------------------------------
    def build_query(
        self,
        served: ServedStore,
        fields: Mapping[str, Any],
        *,
        upload: bytes | None = None,
        inputs: Mapping[str, str] = OWN_INPUTS,
        **settings: Any,
    ) -> Query:
        """One query input of a request -> its Query (with `settings`: k, table, ...).

        The inputs: `q` (the query syntax, "cat - grass"), `terms` (explicit weighted terms),
        or one of text, image (base64, or `upload`), image_url, like, embedding. Files on this
        machine can never be named; URLs are fetched only with allow_url_queries. `inputs`
        maps each input to its request field (clip-retrieval says `embedding_input`)."""
        given = {kind: fields.get(name) for kind, name in inputs.items()}
        if upload is not None:
            given["image"] = upload
        # null and "" mean "not given": clip-retrieval's front sends every field, most null.
        present = [k for k, v in given.items() if v is not None and v != ""]
        if not present:
            if given.get("text") is not None or given.get("q") is not None:
                raise RequestError(400, "empty query: give some text to search for")
            names = ", ".join(name for kind, name in inputs.items() if kind != "terms")
            raise RequestError(400, f"no query: give one of {names}")
        if len(present) > 1:
            names = " and ".join(inputs[k] for k in present)
            raise RequestError(400, f"give exactly one query input, not {names}")
        kind, value = present[0], given[present[0]]
        if kind == "q":
            if not isinstance(value, str):
                raise RequestError(400, "q must be a string in the query syntax")
            terms = parse_terms(value, files=False, urls=self.allow_url_queries)
        elif kind == "terms":
            terms = [self._term(served, item, i) for i, item in enumerate(_list(value))]
        else:
            terms = [self._term(served, {kind: value}, None, inputs[kind])]
        return Query(tuple(terms), **settings)

    def _term(self, served: ServedStore, item: Any, position: int | None,
              label: str | None = None) -> Term:
        """{"text" | "image" | "image_url" | "like" | "embedding": value, "weight": w}."""
        where = "" if position is None else f"terms[{position}]."
        if not isinstance(item, dict):
            raise RequestError(400, f"terms[{position}] must be an object like "
                               '{"text": "cat", "weight": 1}')
        kinds = [k for k in (TEXT, IMAGE, IMAGE_URL, LIKE, EMBEDDING) if k in item]
        unknown = sorted(set(item) - {TEXT, IMAGE, IMAGE_URL, LIKE, EMBEDDING, "weight"})
        if unknown or len(kinds) != 1:
            raise RequestError(400, f"terms[{position}] must have exactly one of text, image, "
                               f"image_url, like, embedding (and a weight)")
        kind = kinds[0]
        value = item[kind]
        weight = item.get("weight", 1.0)
        name = label or f"{where}{kind}"
        if kind == TEXT:
            if not isinstance(value, str):
                raise RequestError(400, f"{name} must be a string")
            return Term(TEXT, value, weight)
        if kind == IMAGE:
            data = value if isinstance(value, bytes) else decode_base64(value, name)
            label = "the uploaded image" if isinstance(value, bytes) else name
            return Term(IMAGE, data, weight, label=label)
        if kind == IMAGE_URL:
            if not self.allow_url_queries:
                raise RequestError(403, URLS_DISABLED)
            if not isinstance(value, str):
                raise RequestError(400, f"{name} must be a string")
            return Term(IMAGE_URL, value, weight)
        if kind == LIKE:
            return Term(LIKE, parse_int(value, name, minimum=0), weight)
        if not isinstance(value, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        ):
            raise RequestError(400, f"{name} must be a list of numbers")
        if len(value) != served.store.dim:
            raise RequestError(400, f"{name} has {len(value)} numbers; this store has "
                               f"{served.store.dim}")
        return Term(EMBEDDING, np.asarray(value, np.float64), weight)

    def fetch_image_url(self, url: str) -> bytes:
        """The bytes at an http(s) URL, within the size and time caps; off unless allowed."""
        if not self.allow_url_queries:
            raise RequestError(403, URLS_DISABLED)
        return fetch_url(url, max_bytes=self.url_max_bytes, timeout_s=self.url_timeout_s)

    # ---- queries -> results ---------------------------------------------------------------
    def run(self, served: ServedStore, query: Query,
            deadline: float | None = None) -> SearchResults:
        """Run a query through the engine, with this store's batcher, lock and generator.
        Its images decode under the process's pixel budget, waiting until `deadline`
        (time.monotonic(); default: the budget's wait from now) at most, else a 503."""
        try:
            return run_query(
                served.collection, query, embedder=served.query_embedder,
                fetch_url=self.fetch_image_url, fallback=served.generate_on_miss,
                lock=served.search_lock, max_image_pixels=self.max_query_pixels,
                decode_gate=self.decode_budget.gate(deadline),
            )
        except StoreError as e:
            if len(served.store) == 0 or query.table == TEXTS:
                # an empty store answers nothing; a store without captions says so
                if query.table == TEXTS:
                    raise RequestError(400, str(e)) from None
                vector = np.zeros(served.store.dim, np.float32)
                return SearchResults([], query, vector)
            raise RequestError(503, str(e)) from None

    def stored_vector(self, served: ServedStore, image_id: int) -> list[float]:
        """The stored embedding of an indexed image (404 when the id isn't in the store)."""
        served.row(image_id)  # a RequestError 404 for an unknown id
        with served.search_lock:
            vector = served.collection.stored_vectors([image_id])[0]
        return [float(x) for x in vector]

    def search(self, served: ServedStore, query: Query) -> list[Hit]:
        """The hits of a query, as the server's rows."""
        return [Hit(r.rank, r.id, r.path, r.score) for r in self.run(served, query)]

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
        if row.t is not None:  # a video's moment: the frame it shows
            from vqret.retrieval.video import VideoError

            try:
                data = self.thumbnails.get_or_make(
                    key, lambda: make_video_thumbnail(path, row.t))
            except VideoError as e:
                raise RequestError(404, f"video {image_id} no longer decodes: {e.cause}"
                                   ) from None
            return data, f'"t{image_id}-{row.hash or "x"}"'
        try:
            data = self.thumbnails.get_or_make(key, lambda: make_thumbnail(path))
        except ImageLoadError as e:
            raise RequestError(404, f"image {image_id} no longer decodes: {e.cause}") from None
        return data, f'"t{image_id}-{row.hash or "x"}"'


def _list(value: Any) -> list:
    if isinstance(value, str):  # a query string or a form field carries the JSON as text
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError(400, "terms is not valid JSON") from None
    if not isinstance(value, list) or not value:
        raise RequestError(400, 'terms must be a non-empty list like [{"text": "cat"}, '
                           '{"text": "grass", "weight": -1}]')
    return value
