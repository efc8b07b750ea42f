"""The Python API's collection: retrieval's Collection with what lives above retrieval.

Retrieval never imports the tokenizer or diffusion (CI checks the layers), so what a user
expects of one collection object but needs those packages is added here: the DiT fallback for
`search(..., generate="auto")`, the tokenizer's codes, and the diffusion
model's line in `info()`. `vqret.Collection` is this class; the CLI and the server use it too.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from vqret.retrieval.collection import Collection as _RetrievalCollection
from vqret.retrieval.engine import Fallback


class Collection(_RetrievalCollection):
    """A store and the embedder that fills and queries it (vqret.retrieval.collection), with
    generate-on-miss and tokenizer codes."""

    def fallback(self) -> Fallback:
        from vqret.diffusion.fallback import generate_on_miss

        return generate_on_miss

    def info(self) -> dict[str, Any]:
        return {**super().info(), "diffusion": self._diffusion_fact()}

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

    def _diffusion_fact(self) -> str:
        from vqret.diffusion.paths import diffusion_path, has_model

        if not has_model(self.store):
            return "none (vqret diffusion train)"
        return f"{diffusion_path(self.store)} (search --generate auto falls back to it)"

