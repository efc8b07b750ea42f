"""The Python API: a collection is a store plus the model it was made with.

    col = Collection.create("photos/")                 # or Collection.open() from inside it
    report = col.index()                                # incremental; report.to_dict()
    hits = col.search(text="a red car", k=5)           # or image="query.jpg" / embedding=vec
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .store import IMAGES, STORE_DIRNAME, TEXTS, Store, StoreError, find_store

if TYPE_CHECKING:  # the embedder imports torch: only when a model is really needed
    from PIL import Image

    from .embedder import Embedder

TEXT_CACHE_SIZE = 4096


@dataclass(frozen=True)
class SearchResult:
    rank: int  # 1-based
    id: int  # row id in its table (images, or texts for text results)
    path: str | None  # image path as stored (relative to the indexed folder); a text: its image
    score: float  # cosine similarity
    text: str | None = None  # set for results from the text table
    image_id: int | None = None  # for a text: the image it describes, when known

    def to_dict(self) -> dict[str, Any]:
        out = {"rank": self.rank, "id": self.id, "path": self.path, "score": self.score}
        if self.text is not None:
            out.update(text=self.text, image_id=self.image_id)
        return out


class Collection:
    """A store and the embedder that fills and queries it."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder | None = None,
        *,
        text_encoder: str | None = None,
        one_shot: bool = False,
        **embedder_kwargs: Any,
    ):
        """`text_encoder`: "auto" embeds text queries with the store's exported ONNX text
        tower when it is there and valid (no torch import), else with the model; "torch"
        always with the model [default: $VQRET_TEXT_ENCODER, else auto]. `one_shot`: this
        process answers one query and exits (the CLI), so load the ONNX encoder for a fast
        start rather than fast repeats."""
        text_encoder = text_encoder or os.environ.get("VQRET_TEXT_ENCODER") or "auto"
        if text_encoder not in ("auto", "torch"):
            raise ValueError(f"unknown text encoder {text_encoder!r}: use auto or torch")
        self.store = store
        self._embedder = embedder
        self._embedder_kwargs = embedder_kwargs
        self._text_choice = text_encoder
        self._one_shot = one_shot
        self._onnx_text: Any = None  # OnnxTextEncoder once loaded
        # why text queries take the torch path (None: not decided yet, "" : they don't)
        self.text_path_reason: str | None = None
        self._text_export_helps = False
        # search indexes and id -> row lookups, valid for one store generation
        self._indexes: dict[str, Any] = {}
        self._lookups: dict[str, dict[int, dict]] = {}
        self._index_generation: int | None = None
        # warm repeated queries skip the text tower (a server sees the same queries often)
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    # ---- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, store: str | os.PathLike | None = None, **embedder_kwargs: Any) -> Collection:
        """Open a store by path, or find the nearest `.vqret` from the current folder up."""
        if store is None:
            found = find_store()
            if found is None:
                raise StoreError(
                    "no vqret store in this folder or its parents: run `vqret index FOLDER` "
                    "first, or pass --store PATH"
                )
            store = found
        path = Path(store)
        if not (path / "manifest.json").is_file() and (path / STORE_DIRNAME).is_dir():
            path = path / STORE_DIRNAME  # the indexed folder was given
        return cls(Store(path), **embedder_kwargs)

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
        **embedder_kwargs: Any,
    ) -> Collection:
        """Open the store for `folder` (default `<folder>/.vqret`), making it when needed.

        A new store uses `model`/`pretrained` (default ViT-B-32 laion2b_s34b_b79k); an existing
        one its own model. An existing store made with another model is refused unless
        `rebuild` is set.
        """
        from .remote import check_local_store, filesystem, is_url, normalise

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
        if embedder is None:
            from .embedder import DEFAULT_MODEL, DEFAULT_PRETRAINED, Embedder

            if existing is not None and model is None and pretrained is None:
                # Re-indexing uses the store's own model unless told otherwise.
                embedder = Embedder.from_spec(existing.spec, **embedder_kwargs)
            else:
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
        wanted = folder if isinstance(folder, str) else str(folder.resolve())
        if existing.source != wanted:
            raise StoreError(
                f"{path} indexes {existing.source}, not {wanted}; use another "
                "--store for this folder"
            )
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

        return index_folder(self.store, self.embedder, folder or self.store.source, **kwargs)

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
            report = sync_texts(writer, self.embedder, rows, owned=from_file(path.name))
            update_after_write(writer, TEXTS)
        return report.to_dict()

    # ---- tokenizer codes (vqret.tokenizer) ------------------------------------------------
    def tokenizer(self, checkpoint: str | os.PathLike | None = None, **kwargs: Any):
        """The store's tokenizer (STORE/tokenizer, or the one its codes were made with), or
        `checkpoint`; kwargs go to Tokenizer.load (device, batch_size)."""
        from vqret.tokenizer.api import Tokenizer
        from vqret.tokenizer.store_codes import store_tokenizer_path

        return Tokenizer.load(store_tokenizer_path(self.store, checkpoint), **kwargs)

    def encode_codes(self, tokenizer: Any = None, **kwargs: Any):
        """Write every image's code grid into the store, incrementally (EncodeReport).
        `tokenizer`: a Tokenizer, a checkpoint path, or None for the store's own."""
        from vqret.tokenizer.store_codes import encode_store

        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = self.tokenizer(tokenizer)
        return encode_store(self.store, tokenizer, **kwargs)

    def decode_codes(
        self, id: int | None = None, path: str | os.PathLike | None = None, tokenizer: Any = None
    ) -> np.ndarray:
        """The picture rebuilt from an image's stored codes, uint8 (S, S, 3)."""
        from vqret.tokenizer.store_codes import decode_row

        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = self.tokenizer(tokenizer)
        return decode_row(self.store, tokenizer, id=id, path=path)

    def duplicates(self, **kwargs: Any):
        """Groups of near-duplicate images from stored codes and embeddings (DupeReport);
        kwargs: threshold, codes_threshold, ... (vqret.tokenizer.dupes.find_duplicates)."""
        from vqret.tokenizer.dupes import find_duplicates

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
            self._indexes[table] = to_search_device(load_index(self.store, table))
        return self._indexes[table]

    def query_embedding(
        self,
        text: str | None = None,
        image: str | os.PathLike | Image.Image | None = None,
    ) -> np.ndarray:
        """The (D,) query vector for a text or an image."""
        if (text is None) == (image is None):
            raise ValueError("give exactly one of text= or image=")
        if text is not None:
            if not text.strip():
                raise ValueError("empty query: give some text to search for")
            with self._cache_lock:
                cached = self._text_cache.get(text)
                if cached is not None:
                    self._text_cache.move_to_end(text)
                    return cached
            vector = self._embed_text(text)
            with self._cache_lock:
                self._text_cache[text] = vector
                if len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
            return vector
        from PIL import Image

        from .images import load_image

        if not isinstance(image, Image.Image):
            image = load_image(image, draft_size=(self.embedder.image_size,) * 2)
        return self.embedder.embed_images([image])[0]

    def search(
        self,
        text: str | None = None,
        image: str | os.PathLike | Image.Image | None = None,
        *,
        embedding: np.ndarray | None = None,
        k: int = 10,
        texts: bool = False,
    ) -> list[SearchResult]:
        """Top-k images (or texts, with texts=True) by cosine similarity to a text, an image,
        or an embedding."""
        if k < 1:
            raise ValueError("k must be >= 1")
        table = TEXTS if texts else IMAGES
        index = self._search_index(table)
        if index.ntotal == 0:
            what = "texts (add captions with `vqret index-texts`)" if texts else "images"
            raise StoreError(f"{self.store.path} has no {what}: index some first")
        if embedding is None:
            embedding = self.query_embedding(text=text, image=image)
        query = np.asarray(embedding, np.float32).reshape(1, -1)
        if query.shape[1] != self.store.dim:
            raise ValueError(f"query has dimension {query.shape[1]}, store has {self.store.dim}")
        from .index import search_index

        scores, ids = search_index(index, query, k)
        # ids whose row is gone (an index of an earlier generation, mid-run) are dropped
        rows = self._lookup(table)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i in rows]
        if table == IMAGES:
            return [SearchResult(rank, i, rows[i]["path"], score)
                    for rank, (i, score) in enumerate(found, start=1)]
        paths = self._lookup(IMAGES)
        results = []
        for rank, (i, score) in enumerate(found, start=1):
            image_id = rows[i]["image_id"]
            path = paths[image_id]["path"] if image_id in paths else None
            results.append(SearchResult(rank, i, path, score, rows[i]["text"], image_id))
        return results

    # ---- text queries without torch -------------------------------------------------------
    def _embed_text(self, text: str) -> np.ndarray:
        encoder = self._fast_text_encoder()
        if encoder is not None:
            from .onnx_text import TextEncoderUnavailable

            try:
                return encoder.embed_texts([text])[0]
            except TextEncoderUnavailable as e:  # its self-check failed: never use it
                self._no_fast_text(e.reason, e.rebuild)
        return self.embedder.embed_texts([text])[0]

    def _fast_text_encoder(self):
        """The ONNX text encoder when this collection may and can use it, else None."""
        if self._onnx_text is not None or self.text_path_reason is not None:
            return self._onnx_text
        kwargs = self._embedder_kwargs
        if self._embedder is not None or self._text_choice == "torch":
            self.text_path_reason = "the model is loaded or asked for"
        elif kwargs.get("device", "auto") not in ("auto", "cpu") or kwargs.get(
            "precision", "fp32"
        ) != "fp32":
            # the export is fp32 on the CPU: the same numbers as the default torch path
            self.text_path_reason = "another device or precision was asked for"
        else:
            from .onnx_text import TextEncoderUnavailable, load_text_encoder

            try:
                self._onnx_text = load_text_encoder(
                    self.store.path, self.store.spec, one_shot=self._one_shot
                )
                self.text_path_reason = ""
            except TextEncoderUnavailable as e:
                self._no_fast_text(e.reason, e.rebuild)
        return self._onnx_text

    def _no_fast_text(self, reason: str, rebuild: bool) -> None:
        import logging

        logging.getLogger(__name__).info("text query through torch: %s", reason)
        self._onnx_text = None
        self.text_path_reason = reason
        self._text_export_helps = rebuild

    @property
    def text_export_would_help(self) -> bool:
        """True when a text query took the torch path because the store's ONNX text encoder
        is missing, stale or damaged: `prepare_fast_text_search()` would mend that."""
        return self._text_export_helps

    def prepare_fast_text_search(self) -> str:
        """Export the model's text tower to ONNX into the store (when not already there and
        up to date), so that later text searches run without torch. Never raises: a model
        that can't be exported keeps the torch path. Returns a short status."""
        from .onnx_export import ensure_text_encoder

        embedder = self.embedder
        # a Ray embedder embeds captions with a local model: that one exports
        embedder = getattr(embedder, "text_embedder", None) or embedder
        status = ensure_text_encoder(self.store.path, embedder)
        self._text_export_helps = False
        return status

    def _lookup(self, table: str) -> dict[int, dict]:
        """id -> row (without embeddings) of a table, cached for the current generation."""
        if table not in self._lookups:
            columns = ["id", "path"] if table == IMAGES else ["id", "text", "image_id"]
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
        m = self.store.manifest
        return {
            "store": str(self.store.path),
            "root": self.store.source,
            "images": len(self.store),
            "model": m["model"]["model"],
            "pretrained": m["model"]["weights_id"],
            "dim": m["dim"],
            "schema_version": m["schema_version"],
            "vqret_version": m["vqret_version"],
            "created_at": m["created_at"],
            "updated_at": m["updated_at"],
            "generation": m["generation"],
            "parts": len(self.store.parts()),
            "texts": self.store.count("texts"),
            "index": self._index_facts(),
            "text_encoder": self._text_encoder_fact(),
            "codes": self._codes_facts(),
            "diffusion": self._diffusion_fact(),
            "failures": m.get("failures", []),
        }

    def _text_encoder_fact(self) -> str:
        from .onnx_text import TextEncoderUnavailable, read_meta

        try:
            read_meta(self.store.path, self.store.spec)
        except TextEncoderUnavailable as e:
            return f"torch ({e.reason})"
        return "onnx (cold text searches skip torch)"

    def _codes_facts(self) -> dict[str, Any]:
        """The tokenizer the codes were last made with, and how many rows have its codes."""
        record = self.store.manifest.get("tokenizer") or {}
        if not record.get("id"):
            return {"tokenizer": "none yet (vqret tokenizer train / encode)"}
        import pyarrow.compute as pc

        tags = self.store.read_table(["codes_tokenizer"]).column("codes_tokenizer")
        encoded = int(pc.sum(pc.equal(tags, record["id"])).as_py() or 0)
        return {
            "tokenizer": record["id"][:12],
            "path": record.get("path"),
            "grid": record.get("grid"),
            "encoded": encoded,  # rows holding codes from this tokenizer
        }

    def _diffusion_fact(self) -> str:
        from vqret.diffusion.paths import diffusion_path, has_model

        if not has_model(self.store):
            return "none (vqret diffusion train)"
        return f"{diffusion_path(self.store)} (search --generate auto falls back to it)"

    def _index_facts(self) -> dict[str, Any]:
        from .index import read_meta

        meta = read_meta(self.store)
        if meta is None:
            return {"kind": "none yet (rebuilt from the rows when searched)"}
        plan = meta.get("plan", {})
        facts = {k: plan.get(k) for k in (
            "kind", "factory", "params", "recall_at_10", "query_ms", "bytes_per_vector",
            "reason", "rebuild_rule", "refine",
        )}
        facts["up_to_date"] = meta.get("generation") == self.store.table_generation()
        return facts


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
