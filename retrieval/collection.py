"""The Python API: a collection is a store plus the model it was made with.

Why past 500 lines: it is the one object a user holds, so opening, indexing and the vector
lookups the query engine asks of it (nearest, among a filter's rows, stored vectors) meet
here; the parts with a job of their own live beside it (text_queries.py, store_facts.py,
filters.py, filtered_search.py, engine.py).

    col = Collection.create("photos/")                 # or Collection.open() from inside it
    report = col.index()                                # incremental; report.to_dict()
    hits = col.search(text="a red car", k=5)           # or image="query.jpg" / embedding=vec
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .engine import Fallback, SearchResults, query_vector, run_query
from .fetch import fetch_url
from .query import Query, QueryError, Term, build_query
from .store import IMAGES, STORE_DIRNAME, TEXTS, Store, StoreError
from .text_queries import TextQueries

if TYPE_CHECKING:  # the embedder imports torch: only when a model is really needed
    from PIL import Image

    from .embedder import Embedder



ALLOWED_CACHE = 16  # filters whose passing rows a collection keeps (per store generation)


@dataclass(frozen=True)
class SearchResult:
    rank: int  # 1-based
    id: int  # row id in its table (images, or texts for text results)
    path: str | None  # image path as stored (relative to the indexed folder); a text: its image
    score: float  # cosine similarity
    text: str | None = None  # set for results from the text table
    image_id: int | None = None  # for a text: the image it describes, when known
    columns: dict[str, Any] | None = None  # row columns a query asked for (taken, camera...)
    # a video's moment (video.py): the shown frame's time and its segment, in seconds
    t: float | None = None
    segment: tuple[float, float] | None = None
    video_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"rank": self.rank, "id": self.id, "path": self.path, "score": self.score}
        if self.text is not None:
            out.update(text=self.text, image_id=self.image_id)
        if self.t is not None:
            out.update(t=round(self.t, 3), segment=[round(v, 3) for v in self.segment or ()],
                       video_id=self.video_id)
        if self.columns:
            out.update(self.columns)
        return out


class Collection:
    """A store and the embedder that fills and queries it."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder | None = None,
        *,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 64,
        num_workers: int | None = None,
        text_encoder: str | None = None,
        one_shot: bool = False,
    ):
        """`device`, `precision`, `batch_size`, `num_workers`: for the model this collection
        loads when it needs one (see Embedder); checked now, not when the model loads.
        `text_encoder`: "auto" embeds text queries with the store's exported ONNX text
        tower when it is there and valid (no torch import), else with the model; "torch"
        always with the model [default: $VQRET_TEXT_ENCODER, else auto]. `one_shot`: this
        process answers one query and exits (the CLI), so load the ONNX encoder for a fast
        start rather than fast repeats."""
        embedder_kwargs = embedder_options(device, precision, batch_size, num_workers)
        self.store = store
        self._embedder = embedder
        self._embedder_kwargs = embedder_kwargs
        self._texts = TextQueries(self, text_encoder, one_shot)
        self._one_shot = one_shot
        # search indexes and id -> row lookups, valid for one store generation
        self._indexes: dict[str, Any] = {}
        self._lookups: dict[str, dict[int, dict]] = {}
        self._index_generation: int | None = None
        self._vectors: tuple[int, np.ndarray, np.ndarray] | None = None  # rows' embeddings
        self._row_filter: Any = None  # filters.RowFilter once a filtered search runs
        self._allowed: dict[tuple, Any] = {}  # (generation, Filters) -> Allowed

    # ---- opening --------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        store: str | os.PathLike | None = None,
        embedder: Embedder | None = None,
        *,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 64,
        num_workers: int | None = None,
        text_encoder: str | None = None,
        one_shot: bool = False,
    ) -> Collection:
        """Open a store by path, or find the nearest `.vqret` from the current folder up.
        The options are __init__'s."""
        options = {"device": device, "precision": precision, "batch_size": batch_size,
                   "num_workers": num_workers, "text_encoder": text_encoder,
                   "one_shot": one_shot}
        embedder_options(device, precision, batch_size, num_workers)  # bad ones fail first
        return cls(Store.open(store), embedder, **options)

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike,
        store: str | os.PathLike | None = None,
        *,
        model: str | None = None,
        pretrained: str | None = None,
        rebuild: bool = False,
        embedder: Embedder | None = None,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 64,
        num_workers: int | None = None,
    ) -> Collection:
        """Open the store for `folder` (default `<folder>/.vqret`), making it when needed.

        A new store uses `model`/`pretrained` (default ViT-B-32 laion2b_s34b_b79k); an existing
        one its own model. An existing store made with another model is refused unless
        `rebuild` is set.
        """
        from .remote import check_local_store, filesystem, is_url, normalise

        embedder_kwargs = embedder_options(device, precision, batch_size, num_workers)
        check_local_store(store)
        if is_url(folder):
            # remote images, local store: no folder of ours to put `.vqret` in
            folder = normalise(str(folder))
            if store is None:
                raise StoreError(f"{folder}: indexing a URL needs --store LOCAL_DIR")
            filesystem(folder)  # its package (s3fs, gcsfs) is there: before a model loads
            path = Path(store)
        else:
            folder = Path(folder)
            if not folder.is_dir():
                raise StoreError(f"{folder}: not a folder")
            path = Path(store) if store is not None else folder / STORE_DIRNAME
        existing = Store(path) if (path / "manifest.json").is_file() else None
        if existing is not None and rebuild:
            _remove_store(path)
            existing = None
        if embedder is None and existing is not None and model is None and pretrained is None:
            # Re-indexing uses the store's own model unless told otherwise, and loads it only
            # when a file needs embedding (Collection.index, deferred_embedder.py).
            if existing.source != _source_of(folder):
                raise _other_source(path, existing, folder)
            return cls(existing, None, **embedder_kwargs)
        if embedder is None:
            from .embedder import DEFAULT_MODEL, DEFAULT_PRETRAINED, Embedder

            embedder = Embedder(
                model or DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED, **embedder_kwargs
            )
        if existing is None:
            return cls(Store.create(path, embedder.spec, folder), embedder)
        if not existing.spec.same_model(embedder.spec):
            old = existing.spec
            raise StoreError(
                f"{path} was made with {old.model} ({old.weights_id}), not "
                f"{embedder.spec.model} ({embedder.spec.weights_id}); pass --rebuild to "
                "start over with the new model"
            )
        if existing.source != _source_of(folder):
            raise _other_source(path, existing, folder)
        return cls(existing, embedder)

    # ---- model ----------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from .embedder import Embedder

            self._embedder = Embedder.from_spec(self.store.spec, **self._embedder_kwargs)
        return self._embedder

    # ---- indexing -------------------------------------------------------------------------
    def index(self, folder: str | os.PathLike | None = None, **kwargs: Any):
        """Index the store's folder (or `folder`) incrementally; returns an IndexReport."""
        from .indexer import index_folder

        return index_folder(self.store, self._deferred_embedder(), folder or self.store.source,
                            **kwargs)

    def _deferred_embedder(self) -> Any:
        """This collection's embedder, or a stand-in that loads it on first use: a run with
        nothing to embed never imports torch (deferred_embedder.py)."""
        if self._embedder is not None:
            return self._embedder
        from .deferred_embedder import DeferredEmbedder

        return DeferredEmbedder(self.store.spec, lambda: self.embedder)

    def index_texts(self, file: str | os.PathLike, *, wait: float = 0) -> dict[str, Any]:
        """Add the texts of a CSV/JSONL file (`text` or `caption`, optional `image` column) to
        the text table; running it again updates that file's rows. Returns the counts."""
        from .index import update_after_write
        from .texts import caption_file_rows, from_file, sync_texts

        path = Path(file)
        if not path.is_file():
            raise StoreError(f"{path}: no such file")
        with self.store.writer(wait) as writer:
            images = self.store.read_table(["id", "path"])
            image_ids = dict(zip(images.column("path").to_pylist(),
                                 images.column("id").to_pylist(), strict=True))
            rows = caption_file_rows(path, image_ids)
            report = sync_texts(writer, self._deferred_embedder(), rows,
                                owned=from_file(path.name))
            update_after_write(writer, TEXTS)
        return report.to_dict()

    def duplicates(self, **kwargs: Any):
        """Groups of near-duplicate images from stored codes and embeddings (DupeReport);
        kwargs: threshold, codes_threshold, ... (vqret.retrieval.dupes.find_duplicates)."""
        from .dupes import find_duplicates

        return find_duplicates(self.store, **kwargs)

    # ---- searching ------------------------------------------------------------------------
    def _search_index(self, table: str = IMAGES):
        from .index import load_index, to_search_device

        self.store.refresh()  # answer from the last committed state, even while indexing
        if self._index_generation != self.store.generation:
            self._indexes.clear()
            self._lookups.clear()
            self._index_generation = self.store.generation
        if table not in self._indexes:
            from .exact_small import small_exact_index

            # a small exact table is searched in numpy: no faiss import (exact_small.py)
            index = small_exact_index(self.store, table)
            if index is None:
                if self._one_shot:
                    import faiss

                    # One query: faiss' OpenMP threads cost more in start-up and barriers
                    # than they save (exact search over 1M vectors measured 92 ms on 1
                    # thread, 358 ms on 2). Process-wide, which a one-shot process is.
                    faiss.omp_set_num_threads(1)
                device = self._embedder_kwargs["device"]
                index = to_search_device(load_index(self.store, table), device)
            self._indexes[table] = index
        return self._indexes[table]

    def query_embedding(
        self,
        text: str | None = None,
        image: str | os.PathLike | Image.Image | None = None,
    ) -> np.ndarray:
        """The (D,) unit vector for one text or one image (a one-term query)."""
        if (text is None) == (image is None):
            raise QueryError("give exactly one of text= or image=")
        term = Term.text(text) if text is not None else Term.image(image)
        return query_vector(self, Query((term,)))

    def query_embedder(self) -> _OwnEmbedder:
        """How this collection embeds query terms: texts through its cache and the ONNX fast
        path when it has one, images through the model."""
        return _OwnEmbedder(self)

    def embed_query_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) embeddings of query texts; the ones not cached in one model call."""
        return self._texts.embed(list(texts))

    def search(
        self,
        query: str | Sequence[str] | Query | None = None,
        image: str | os.PathLike | Image.Image | None = None,
        *,
        text: str | None = None,
        embedding: np.ndarray | None = None,
        like: int | None = None,
        terms: Sequence[Term] = (),
        k: int = 10,
        texts: bool = False,
        dedupe: bool = False,
        generate: str = "never",
        threshold: float | None = None,
        seed: int = 0,
        where: str | None = None,
        folder: str | None = None,
        after: Any = None,
        before: Any = None,
        types: Sequence[str] | str = (),
        camera: str | None = None,
        min_score: float | None = None,
        columns: Sequence[str] | str = (),
        per_video: int | None = None,
    ) -> SearchResults:
        """Top-k images (or texts, with texts=True) by cosine similarity to a query.

        `query` is the query syntax (`"cat - grass + 2:./dog.jpg"`, vqret.retrieval.query) or a
        Query; `text` is one literal text, `image` a file or PIL image, `like` a stored image
        id ("more like this", never a result itself), `embedding` a (D,) vector, `terms`
        explicit Terms: every one given is a term of weight 1, summed. `dedupe` drops results
        within cosine 0.94 of a better one. `generate` ("never", "auto", "always"): draw a
        picture when nothing matches well (auto: best score below `threshold`, default
        calibrated), on collections that have the diffusion fallback (vqret.Collection).
        Filters (vqret.retrieval.filters): `where` a SQL condition over the rows' columns,
        `folder` a path prefix or glob, `after`/`before` dates of capture, `types` file types,
        `camera` a make/model substring, `min_score` a cosine floor; the top-k is exact among
        the images that pass. `columns` ("taken,camera") come back in each hit's `columns`.
        `per_video`: at most this many moments of one video (1: its best); a video's hits
        have `t` (seconds) and `segment` (start, end).
        Returns SearchResults, a list of SearchResult with
        `.generated`, `.query` and `.note`. Bad input raises QueryError."""
        if isinstance(query, Query):
            return self.run(query)
        given: list[Term] = list(terms)
        if text is not None:
            given.append(Term.text(text))
        if image is not None:
            given.append(Term.image(image))
        if like is not None:
            given.append(Term.like(like))
        if embedding is not None:
            given.append(Term.embedding(embedding))
        filters = None
        if any(v not in (None, ()) for v in (where, folder, after, before, types, camera,
                                              min_score)):
            from .filters import Filters

            filters = Filters(where=where, folder=folder, after=after, before=before,
                              types=types, camera=camera, min_score=min_score)
        return self.run(build_query(
            query, terms=given, k=k, table=TEXTS if texts else IMAGES, dedupe=dedupe,
            generate=generate, threshold=threshold, seed=seed, filters=filters,
            columns=columns, per_video=per_video,
        ))

    def run(self, query: Query) -> SearchResults:
        """Run a Query through the engine with this collection's own embedder and fallback."""
        return run_query(self, query, fetch_url=fetch_url, fallback=self.fallback())

    def fallback(self) -> Fallback | None:
        """Generate-on-miss for this collection: none here (retrieval doesn't draw);
        vqret.Collection supplies the diffusion one."""
        return None

    def nearest(self, vector: np.ndarray, k: int, table: str = IMAGES,
                allowed: np.ndarray | None = None) -> list[SearchResult]:
        """The k rows of `table` nearest to a (D,) query vector, best first; only among the
        `allowed` ids when given (exact top-k whatever their number)."""
        if k < 1:
            raise QueryError(f"k must be an integer, 1 or more, not {k}")
        index = self._search_index(table)
        damaged = self.store.damaged_parts(table)
        if damaged and allowed is None:
            # the saved index still holds a damaged part's vectors: rank only the rows there
            if table == IMAGES:
                allowed = self._healthy_ids()
            else:
                k += sum(d.rows or 0 for d in damaged)  # few texts: look further instead
        if damaged and (index.ntotal == 0 or (allowed is not None and len(allowed) == 0)):
            return []  # every row is in a damaged part: the note says so (engine.py)
        if index.ntotal == 0:
            what = "texts (add captions with `vqret index-texts`)" if table == TEXTS else "images"
            raise StoreError(f"{self.store.path} has no {what}: index some first")
        query = np.asarray(vector, np.float32).reshape(1, -1)
        if query.shape[1] != self.store.dim:
            raise QueryError(f"embedding has {query.shape[1]} numbers; this store has "
                             f"{self.store.dim}")
        if allowed is not None:
            scores, ids = self._search_among(index, query, k, allowed)
        else:
            from .index import search_index

            scores, ids = search_index(index, query, k)
        # ids whose row is gone (an index of an earlier generation, mid-run) are dropped
        rows = self._lookup(table)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i in rows]
        if table == IMAGES:
            return [SearchResult(rank, i, rows[i]["path"], score, **_moment(rows[i]))
                    for rank, (i, score) in enumerate(found, start=1)]
        paths = self._lookup(IMAGES)
        results = []
        for rank, (i, score) in enumerate(found, start=1):
            image_id = rows[i]["image_id"]
            path = paths[image_id]["path"] if image_id in paths else None
            results.append(SearchResult(rank, i, path, score, rows[i]["text"], image_id))
        return results

    def damage_note(self, table: str = IMAGES) -> str | None:
        """One line when some rows of `table` are unavailable (damaged parts), else None."""
        from .part_health import unavailable_note

        return unavailable_note(self.store.damaged_parts(table))

    def _healthy_ids(self) -> Any:
        """The images whose part is readable, as a filtered_search.Allowed, per generation."""
        from .filtered_search import Allowed

        key = (self.store.generation, "healthy")
        if key not in self._allowed:
            ids = np.fromiter(self._lookup(IMAGES).keys(), np.int64)
            self._allowed[key] = Allowed.from_ids(ids)
        return self._allowed[key]

    def _search_among(self, index: Any, query: np.ndarray, k: int,
                      allowed: Any) -> tuple[np.ndarray, np.ndarray]:
        """The exact-or-near top-k among the allowed rows, at any selectivity
        (filtered_search.py: exact over few rows, the index's ID selector over many)."""
        from .exact_small import ExactVectors

        if isinstance(index, ExactVectors):
            scores, ids = index.search_among(query, k, allowed)
        else:
            from .filtered_search import search_filtered

            scores, ids = search_filtered(index, query, k, allowed, vectors_of=self._vectors_of)
        keep = ids[0] >= 0
        return scores[:, keep], ids[:, keep]

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """(n, D) stored embeddings of `ids`; a NaN row for an id without one."""
        present, vectors = self._row_vectors(ids)
        if present.all():
            return vectors
        out = np.full((len(ids), self.store.dim), np.nan, np.float32)
        out[present] = vectors
        return out

    def row_values(self, ids: Sequence[int], columns: Sequence[str]) -> dict[int, dict]:
        """id -> {column: value} of images' row columns (those filters see), JSON-able."""
        return self._rows_sql().values(self.store, list(ids), tuple(columns))

    def _rows_sql(self):
        if self._row_filter is None:
            from .filters import RowFilter

            self._row_filter = RowFilter()
        self.store.refresh()
        return self._row_filter

    def passing_ids(self, filters: Any) -> Any:
        """The images that pass `filters`' row filters (vqret.retrieval.filters: sandboxed
        DuckDB over the rows), as a filtered_search.Allowed (len() is their number), kept
        for the store generation: the same filter under another query costs nothing."""
        from .filtered_search import Allowed

        rows = self._rows_sql()
        key = (self.store.generation, filters)
        cached = self._allowed.get(key)
        if cached is None:
            cached = Allowed.from_ids(rows.passing_ids(self.store, filters))
            if len(self._allowed) >= ALLOWED_CACHE:
                self._allowed.pop(next(iter(self._allowed)))
            self._allowed[key] = cached
        return cached

    def _row_vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(present[len(ids)] bool, (n_present, D) embeddings) from the rows, which are read
        once per store generation."""
        generation = self.store.generation
        if self._vectors is None or self._vectors[0] != generation:
            all_ids, vectors = self.store.vectors()
            order = np.argsort(all_ids)
            self._vectors = (generation, all_ids[order], vectors[order])
        _, all_ids, vectors = self._vectors
        wanted = np.asarray(ids, np.int64)
        if len(all_ids) == 0:
            return np.zeros(len(wanted), bool), vectors[:0]
        pos = np.minimum(np.searchsorted(all_ids, wanted), len(all_ids) - 1)
        present = all_ids[pos] == wanted
        return present, vectors[pos[present]]

    def stored_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), D) stored embeddings of indexed images (more like this, dedupe)."""
        try:
            # The index holds every vector already, exactly, when it is flat or HNSW-flat:
            # then no copy is needed. IVF/PQ (lossy or without a direct map) and GPU indexes
            # fall through to the rows, read once per store generation.
            index = self._search_index()
            if _stores_exact_vectors(index):
                present = self._lookup(IMAGES)
                if all(int(i) in present for i in ids):
                    return np.stack([index.reconstruct(int(i)) for i in ids]).astype(np.float32)
        except StoreError:
            raise
        except Exception:  # noqa: BLE001 - an index that can't give vectors back: read the rows
            pass
        present, vectors = self._row_vectors(ids)
        if not present.all():
            missing = int(np.asarray(ids, np.int64)[~present][0])
            raise QueryError(f"no image with id {missing} in this store", status=404)
        return vectors

    # ---- text queries without torch (text_queries.py) -------------------------------------
    @property
    def text_path_reason(self) -> str | None:
        """Why text queries take the torch path (None: not decided yet, "": they don't)."""
        return self._texts.reason

    @property
    def text_export_would_help(self) -> bool:
        """True when a text query took the torch path because the store's ONNX text encoder
        is missing, stale or damaged: `prepare_fast_text_search()` would mend that."""
        return self._texts.export_would_help

    def prepare_fast_text_search(self, raise_io_errors: bool = False) -> str:
        """Export the model's text tower to ONNX into the store (when not already there and
        up to date), so that later text searches run without torch. Never raises: a model
        that can't be exported keeps the torch path; a write that failed (full disk) raises
        its OSError only with `raise_io_errors`. Returns a short status."""
        return self._texts.prepare(raise_io_errors)

    def _lookup(self, table: str) -> dict[int, dict]:
        """id -> row (without embeddings) of a table, cached for the current generation."""
        if table not in self._lookups:
            columns = (["id", "path", "video_id", "t", "segment_start", "segment_end"]
                       if table == IMAGES else ["id", "text", "image_id"])
            rows = self.store.read_table(columns, table).to_pylist()
            self._lookups[table] = {r["id"]: r for r in rows}
        return self._lookups[table]

    def resolve(self, result: SearchResult | str) -> Path | str:
        """The file on disk for a result (or a stored path); its URL in a store of URLs."""
        path = result.path if isinstance(result, SearchResult) else result
        if self.store.root_url is not None:
            return path  # rows of remote images keep their full URL
        return self.store.root / path

    def info(self) -> dict[str, Any]:
        """What the store holds: model, counts, index, text encoder, codes, failures."""
        from .store_facts import store_facts

        return store_facts(self.store)


def _moment(row: dict) -> dict[str, Any]:
    """A video row's SearchResult fields (t, segment, video_id); none for an image."""
    if row.get("t") is None:
        return {}
    return {"t": row["t"], "segment": (row["segment_start"], row["segment_end"]),
            "video_id": row["video_id"]}


class _OwnEmbedder:
    """A collection's QueryEmbedder: its text cache / ONNX path, and its model for images."""

    def __init__(self, collection: Collection):
        self.collection = collection

    @property
    def image_size(self) -> int:
        return self.collection.embedder.image_size

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.collection.embed_query_texts(list(texts))

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.collection.embedder.embed_images(list(images))


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def embedder_options(device: str, precision: str, batch_size: int,
                     num_workers: int | None) -> dict[str, Any]:
    """The model options a collection passes on, checked now: a typo fails at the call."""
    from .device import check_device_name

    check_device_name(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer, 1 or more, not {batch_size!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers must be an integer, 0 or more, not {num_workers!r}")
    return {"device": device, "precision": precision, "batch_size": batch_size,
            "num_workers": num_workers}


def _stores_exact_vectors(index: Any) -> bool:
    from .exact_small import ExactVectors

    if isinstance(index, ExactVectors):
        return True
    import faiss

    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return isinstance(inner, faiss.IndexFlat | faiss.IndexHNSWFlat)


def _source_of(folder: str | Path) -> str:
    """The folder as a store records it: a URL as given, a local folder resolved."""
    return folder if isinstance(folder, str) else str(folder.resolve())


def _other_source(path: Path, existing: Store, folder: str | Path) -> StoreError:
    return StoreError(f"{path} indexes {existing.source}, not {_source_of(folder)}; use "
                      "another --store for this folder")


def _remove_store(path: Path) -> None:
    if not (path / "manifest.json").is_file():
        raise StoreError(f"{path} doesn't look like a vqret store; not removing it")
    from filelock import FileLock, Timeout

    lock = FileLock(str(path / "lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StoreError(f"{path}: another `vqret index` is writing to it") from None
    try:
        shutil.rmtree(path)
    finally:
        lock.release()
