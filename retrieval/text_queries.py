"""Query texts -> vectors for a collection: an LRU cache, then the store's ONNX text tower when
it is there and valid (a cold `vqret search` needs no torch), else the model.

The ONNX export is fp32 on the CPU: the same numbers as the default torch path, so it is only
used when that is what the collection would run (device auto/cpu, precision fp32), and never
once the model is loaded anyway.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .collection import Collection

TEXT_CACHE_SIZE = 4096  # warm repeated queries skip the text tower (a server repeats often)
TEXT_ENCODERS = ("auto", "torch")


class TextQueries:
    """The text side of one collection's queries."""

    def __init__(self, collection: Collection, choice: str | None, one_shot: bool):
        choice = choice or os.environ.get("VQRET_TEXT_ENCODER") or "auto"
        if choice not in TEXT_ENCODERS:
            raise ValueError(f"unknown text encoder {choice!r}: use auto or torch")
        self.collection = collection
        self.choice = choice
        self.one_shot = one_shot  # one query, then exit: load the ONNX session for a fast start
        self.onnx: Any = None  # OnnxTextEncoder once loaded
        self.reason: str | None = None  # why texts take torch (None: undecided, "": they don't)
        self.export_would_help = False
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, D) embeddings; the texts not cached go in one encoder call."""
        out: list[np.ndarray | None] = [None] * len(texts)
        with self._lock:
            for i, text in enumerate(texts):
                cached = self._cache.get(text)
                if cached is not None:
                    self._cache.move_to_end(text)
                    out[i] = cached
        missing = sorted({t for t, v in zip(texts, out, strict=True) if v is None})
        if missing:
            fresh = dict(zip(missing, self._encode(missing), strict=True))
            with self._lock:
                for text, vector in fresh.items():
                    self._cache[text] = vector
                    if len(self._cache) > TEXT_CACHE_SIZE:
                        self._cache.popitem(last=False)
            out = [fresh[t] if v is None else v for t, v in zip(texts, out, strict=True)]
        return np.stack(out)

    def _encode(self, texts: list[str]) -> np.ndarray:
        encoder = self._fast_encoder()
        if encoder is not None:
            from .onnx_text import TextEncoderUnavailable

            try:
                return encoder.embed_texts(texts)
            except TextEncoderUnavailable as e:  # its self-check failed: never use it
                self._no_fast_path(e.reason, e.rebuild)
        return self.collection.embedder.embed_texts(texts)

    def _fast_encoder(self):
        """The ONNX text encoder when this collection may and can use it, else None."""
        if self.onnx is not None or self.reason is not None:
            return self.onnx
        collection = self.collection
        options = collection._embedder_kwargs
        if collection._embedder is not None or self.choice == "torch":
            self.reason = "the model is loaded or asked for"
        elif options["device"] not in ("auto", "cpu") or options["precision"] != "fp32":
            self.reason = "another device or precision was asked for"
        else:
            from .onnx_text import TextEncoderUnavailable, load_text_encoder

            store = collection.store
            try:
                self.onnx = load_text_encoder(store.path, store.spec, one_shot=self.one_shot)
                self.reason = ""
            except TextEncoderUnavailable as e:
                self._no_fast_path(e.reason, e.rebuild)
        return self.onnx

    def _no_fast_path(self, reason: str, rebuild: bool) -> None:
        logging.getLogger(__name__).info("text query through torch: %s", reason)
        self.onnx = None
        self.reason = reason
        self.export_would_help = rebuild

    def prepare(self, raise_io_errors: bool = False) -> str:
        """Export the text tower into the store (Collection.prepare_fast_text_search)."""
        from .onnx_export import ensure_text_encoder

        collection = self.collection
        if collection._embedder is None:
            # Nothing loaded the model (a run with nothing to embed): a bundle whose meta and
            # file sizes fit is taken as it is, without loading ONNX Runtime, and the model
            # loads only for an export. A search checks the probe before it trusts a bundle,
            # and mends a bad one (onnx_text.py).
            from .deferred_embedder import DeferredEmbedder
            from .onnx_text import bundle_looks_ready

            store = collection.store
            if bundle_looks_ready(store.path, store.spec):
                self.export_would_help = False
                return "ready"
            embedder = DeferredEmbedder(store.spec, lambda: collection.embedder)
        else:
            embedder = collection.embedder
            # a Ray embedder embeds captions with a local model: that one exports
            embedder = getattr(embedder, "text_embedder", None) or embedder
        status = ensure_text_encoder(collection.store.path, embedder,
                                     raise_io_errors=raise_io_errors)
        self.export_would_help = False
        return status
