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

__all__ = ["DIFFUSION_DIRNAME", "atomic_write", "diffusion_path", "has_model", "open_store"]

DIFFUSION_DIRNAME = "diffusion"
WEIGHTS_NAME = "diffusion.safetensors"


def open_store(store: str | os.PathLike[str] | None) -> Store:
    """A store by path (or its indexed folder), or the nearest one from here up."""
    return Store.open(store)


def diffusion_path(store: Store, given: str | os.PathLike[str] | None = None) -> Path:
    """The DiT checkpoint folder of `store` (or `given`)."""
    return Path(given) if given is not None else store.path / DIFFUSION_DIRNAME


def has_model(store: Store, given: str | os.PathLike[str] | None = None) -> bool:
    """Whether a diffusion checkpoint is there (no torch import: `vqret search` asks this)."""
    try:
        weights_file(diffusion_path(store, given), WEIGHTS_NAME, "no diffusion model")
    except ValueError:
        return False
    return True
