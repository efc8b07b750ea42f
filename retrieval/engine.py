"""The query engine: one function runs a Query against a collection, for every surface.

    results = run_query(collection, query)                  # SearchResults (a list of hits)
    results.generated                                       # the drawn picture's record, or None

The CLI, the server (its own API and clip-retrieval's) and the Python API only translate to a
Query and from SearchResults. What differs between them is injected, never re-implemented:
- `embedder`: how term embeddings are computed (the collection's own text cache and ONNX path,
  or the server's batcher). Every text of a query goes in one call, every image in another,
  so a 3-term query costs one forward pass per modality, not three.
- `fetch_url`: how an image URL becomes bytes (the CLI and Python fetch; a server only when it
  was started with --allow-url-queries).
- `fallback`: generate-on-miss (vqret.diffusion.fallback.generate_on_miss). Retrieval doesn't
  import diffusion, so a surface passes it in; without one, `generate` is only "never".
- `lock`: held around index reads (a server's per-store lock).
- `decode_gate`: entered with the pixels of each query image about to be decoded (a server's
  process-wide budget of pixels in flight; images.load_image).

Steps: terms -> unit vectors -> weighted sum, renormalised (query.combine) -> k nearest (more
when dedupe or "more like this" filter some out) -> drop the liked images themselves -> dedupe
-> top k, ranked 1.. -> the fallback decides whether to draw.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .query import EMBEDDING, IMAGE, IMAGE_URL, IMAGES, LIKE, TEXT, Query, QueryError, combine

if TYPE_CHECKING:
    from PIL import Image

    from .collection import Collection, SearchResult
    from .images import DecodeGate

# clip-retrieval's deduplicate: a result this close (cosine) to a better one is a duplicate.
DEDUP_THRESHOLD = 0.94
DEDUP_FETCH_FACTOR = 5  # duplicates are dropped after the knn: look this much further
# --per-video drops a video's moments past its best few: look this much further (a video
# of many segments can fill a short list on its own)
PER_VIDEO_FETCH_FACTOR = 10
MAX_QUERY_PIXELS = 50_000_000  # query images: well above any camera, far below a bomb
# Query images are decoded at reduced size (JPEG draft, then Image.reduce) but kept at least
# this many times the model's input on both sides, so the preprocess still resizes down with
# its own filter from a sharp image: a 49 MP PNG costs little more than a phone photo.
QUERY_DECODE_FACTOR = 2


class QueryEmbedder(Protocol):
    """Turns a query's texts and images into (N, D) embeddings (each row any non-zero norm)."""

    image_size: int

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@dataclass(frozen=True)
class FallbackOutcome:
    generated: dict[str, Any] | None  # the drawn picture's record (path, clip_score, ...)
    note: str | None  # one line saying what was decided and why


# (collection, query, query vector, hits) -> FallbackOutcome
Fallback = Callable[["Collection", Query, np.ndarray, list], FallbackOutcome]


class SearchResults(list):
    """The ranked hits (a list of SearchResult), and what else the query produced."""

    def __init__(self, hits: Sequence[SearchResult], query: Query, vector: np.ndarray,
                 outcome: FallbackOutcome | None = None):
        super().__init__(hits)
        self.query = query
        self.vector = vector  # (D,) the unit query vector the hits are scored against
        self.generated = outcome.generated if outcome else None
        self.note = outcome.note if outcome else None

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query.describe(), "results": [h.to_dict() for h in self],
                "generated": self.generated}


def run_query(
    collection: Collection,
    query: Query,
    *,
    embedder: QueryEmbedder | None = None,
    fetch_url: Callable[[str], bytes] | None = None,
    fallback: Fallback | None = None,
    lock: contextlib.AbstractContextManager | None = None,
    max_image_pixels: int = MAX_QUERY_PIXELS,
    decode_gate: DecodeGate | None = None,
) -> SearchResults:
    """Run `query` on `collection` (module docstring). Bad input raises QueryError; a store
    with nothing to search raises StoreError."""
    if query.generate == "always" and fallback is None:
        raise QueryError("generate always needs the diffusion fallback, which this surface "
                         "doesn't have; use generate auto or never")
    lock = lock or contextlib.nullcontext()
    vector = query_vector(collection, query, embedder=embedder, fetch_url=fetch_url,
                          lock=lock, max_image_pixels=max_image_pixels,
                          decode_gate=decode_gate)
    with lock:
        hits, note = nearest_hits(collection, query, vector)
    outcome = FallbackOutcome(None, note) if note else None
    if query.generate != "never" and query.table == IMAGES and fallback is not None and not note:
        outcome = fallback(collection, query, vector, hits)
    damage = collection.damage_note(query.table)  # rows of a damaged part: not searched
    if damage:
        said = outcome.note if outcome else None
        outcome = FallbackOutcome(outcome.generated if outcome else None,
                                  f"{said}; {damage}" if said else damage)
    return SearchResults(hits, query, vector, outcome)


def query_vector(
    collection: Collection,
    query: Query,
    *,
    embedder: QueryEmbedder | None = None,
    fetch_url: Callable[[str], bytes] | None = None,
    lock: contextlib.AbstractContextManager | None = None,
    max_image_pixels: int = MAX_QUERY_PIXELS,
    decode_gate: DecodeGate | None = None,
) -> np.ndarray:
    """The (D,) unit vector of a query's weighted terms; texts and images each in one batch."""
    embedder = embedder or collection.query_embedder()
    dim = collection.store.dim
    vectors: list[np.ndarray | None] = [None] * len(query.terms)
    texts, images = [], []  # (position, value)
    for i, term in enumerate(query.terms):
        if term.kind == TEXT:
            texts.append((i, term.value))
        elif term.kind == IMAGE:
            images.append((i, _load(term.value, term.name, embedder, max_image_pixels,
                                    decode_gate)))
        elif term.kind == IMAGE_URL:
            if fetch_url is None:
                raise QueryError(f"{term.value}: image URLs are not fetched here", status=403)
            data = fetch_url(term.value)
            images.append((i, _load(data, term.value, embedder, max_image_pixels,
                                    decode_gate)))
        elif term.kind == EMBEDDING:
            vectors[i] = _embedding(term.value, dim)
    likes = [(i, t.value) for i, t in enumerate(query.terms) if t.kind == LIKE]
    if likes:
        with lock or contextlib.nullcontext():
            stored = collection.stored_vectors([image_id for _, image_id in likes])
        for (i, _), vector in zip(likes, stored, strict=True):
            vectors[i] = vector
    if texts:
        for (i, _), vector in zip(texts, embedder.embed_texts([t for _, t in texts]),
                                  strict=True):
            vectors[i] = vector
    if images:
        for (i, _), vector in zip(images, embedder.embed_images([im for _, im in images]),
                                  strict=True):
            vectors[i] = vector
    return combine(np.stack(vectors), [t.weight for t in query.terms])


def nearest_hits(collection: Collection, query: Query,
                 vector: np.ndarray) -> tuple[list, str | None]:
    """The top-k SearchResults for a unit vector, after the filters, "more like this" and
    dedupe; and a one-line note when the filters leave nothing to rank."""
    excluded = set(query.like_ids) if query.table == IMAGES else set()
    fetch = max(query.k, query.fetch or query.k)
    if query.dedupe:
        fetch = max(fetch, query.k * DEDUP_FETCH_FACTOR)
    if query.per_video is not None:
        fetch = max(fetch, query.k * PER_VIDEO_FETCH_FACTOR)
    filters = query.filters
    allowed = None
    if filters is not None and filters.selects_rows:
        allowed = collection.passing_ids(filters)
        if allowed.count == 0:
            return [], f"no image passes the filters ({_said(filters)}): nothing to rank"
    results = collection.nearest(vector, fetch + len(excluded), table=query.table,
                                 allowed=allowed)
    results = [r for r in results if r.id not in excluded]
    if filters is not None and filters.min_score is not None:
        results = [r for r in results if r.score >= filters.min_score]
    if query.dedupe and len(results) > 1:
        stored = collection.stored_vectors([r.id for r in results])
        results = [r for r, keep in zip(results, unique_mask(stored), strict=True) if keep]
    if query.per_video is not None:
        results = _per_video(results, query.per_video)
    results = results[: query.k]
    values = collection.row_values([r.id for r in results], query.columns) \
        if query.columns else {}
    hits = [replace(r, rank=rank, columns=values.get(r.id))
            for rank, r in enumerate(results, start=1)]
    note = None
    if not hits and filters is not None and filters.min_score is not None:
        note = f"no result scores {filters.min_score} or more"
    return hits, note


def _per_video(results: list, n: int) -> list:
    """Rank-ordered hits with at most `n` of each video (its best); images all kept."""
    seen: dict[int, int] = {}
    kept = []
    for r in results:
        if r.video_id is not None:
            seen[r.video_id] = seen.get(r.video_id, 0) + 1
            if seen[r.video_id] > n:
                continue
        kept.append(r)
    return kept


def _said(filters: Any) -> str:
    return ", ".join(f"{k} {','.join(v) if isinstance(v, list) else v}"
                     for k, v in filters.describe().items())


def unique_mask(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Rank-ordered (N, D) normalised vectors -> keep[N]: False where a better one is >= t."""
    sims = vectors @ vectors.T  # (N, N) cosine
    better = np.tril(sims >= threshold, k=-1)  # [i, j] for j < i: j ranks above i
    return ~better.any(axis=1)


# --------------------------------------------------------------------------------------------


def _load(source: Any, name: str, embedder: QueryEmbedder, max_pixels: int,
          gate: DecodeGate | None = None):
    from PIL import Image

    from .images import ImageLoadError, load_image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, bytes | bytearray) and not source:
        raise QueryError(f"{name}: the image is empty (0 bytes)")
    if isinstance(source, str | os.PathLike) and not os.path.isfile(source):
        raise QueryError(f"{name}: no such image file")
    size = embedder.image_size
    reduced = (QUERY_DECODE_FACTOR * size, QUERY_DECODE_FACTOR * size)
    try:
        return load_image(source, max_pixels=max_pixels, draft_size=(size, size),
                          reduce_size=reduced, gate=gate)
    except ImageLoadError as e:
        raise QueryError(f"{name}: not an image vqret can read: {e.cause}") from None


def _embedding(value: Any, dim: int) -> np.ndarray:
    try:
        vector = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise QueryError("embedding must be a list of numbers") from None
    if vector.ndim != 1 or vector.dtype.kind not in "fiu":
        raise QueryError("embedding must be a list of numbers")
    if len(vector) != dim:
        raise QueryError(f"embedding has {len(vector)} numbers; this store has {dim}")
    if not np.all(np.isfinite(vector)) or not np.any(vector):
        raise QueryError("embedding must be a finite, non-zero vector")
    return vector
