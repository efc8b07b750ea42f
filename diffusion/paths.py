"""Where a store keeps its DiT (STORE/diffusion). Torch-free: `vqret search` asks `has_model`
on its cold path. (The tokenizer's place: vqret.tokenizer.store_codes.)

`atomic_write` is vqret.retrieval.atomic's, re-exported for the modules that import it from
here (diffusion/fallback.py)."""

from __future__ import annotations

import os
from pathlib import Path

from vqret.retrieval.atomic import atomic_write
from vqret.retrieval.store import Store
from vqret.retrieval.weights import weights_file

__all__ = ["DIFFUSION_DIRNAME", "atomic_write", "diffusion_path", "has_model"]

DIFFUSION_DIRNAME = "diffusion"
WEIGHTS_NAME = "diffusion.safetensors"


def diffusion_path(store: Store, given: str | os.PathLike[str] | None = None) -> Path:
    """The DiT checkpoint folder of `store` (or `given`)."""
    return Path(given) if given is not None else store.path / DIFFUSION_DIRNAME


def has_model(store: Store, given: str | os.PathLike[str] | None = None) -> bool:
    """Whether a diffusion checkpoint is there (no torch import: `vqret search` asks this,
    and the server on every query: the store's own place is one stat)."""
    if given is None:
        return os.path.isfile(os.path.join(store.path, DIFFUSION_DIRNAME, WEIGHTS_NAME))
    try:
        weights_file(diffusion_path(store, given), WEIGHTS_NAME, "no diffusion model")
    except ValueError:
        return False
    return True
