"""Where a store keeps its models: STORE/diffusion (the DiT) and STORE/tokenizer."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from vqret.retrieval.store import STORE_DIRNAME, Store, StoreError, find_store

__all__ = ["DIFFUSION_DIRNAME", "TOKENIZER_DIRNAME", "atomic_write", "diffusion_path",
           "has_model", "open_store", "store_tokenizer_path"]

DIFFUSION_DIRNAME = "diffusion"
TOKENIZER_DIRNAME = "tokenizer"  # as `vqret tokenizer train --store` writes it
WEIGHTS_NAME = "diffusion.safetensors"


def open_store(store: str | os.PathLike[str] | None) -> Store:
    """A store by path (or its indexed folder), or the nearest one from here up."""
    if store is None:
        found = find_store()
        if found is None:
            raise StoreError("no vqret store in this folder or its parents: run `vqret index "
                             "FOLDER` first, or pass --store PATH")
        store = found
    path = Path(store)
    if not (path / "manifest.json").is_file() and (path / STORE_DIRNAME).is_dir():
        path = path / STORE_DIRNAME
    return Store(path)


def diffusion_path(store: Store, given: str | os.PathLike[str] | None = None) -> Path:
    """The DiT checkpoint folder of `store` (or `given`)."""
    return Path(given) if given is not None else store.path / DIFFUSION_DIRNAME


def has_model(store: Store, given: str | os.PathLike[str] | None = None) -> bool:
    """Whether a diffusion checkpoint is there (no torch import: `vqret search` asks this)."""
    path = diffusion_path(store, given)
    return path.is_file() if path.suffix == ".safetensors" else (path / WEIGHTS_NAME).is_file()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through `write(tmp_path)` beside `path`, then rename: a run killed mid-save keeps
    the previous file."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(str(tmp))
        umask = os.umask(0)  # safetensors writes 0600; give it a new file's usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def store_tokenizer_path(store: Store, given: str | os.PathLike[str] | None = None,
                         recorded: str | None = None) -> Path:
    """The tokenizer to use: `given`, else the one the store's codes were made with (its
    manifest, as `vqret tokenizer encode` records it), else STORE/tokenizer, else `recorded`
    (where a diffusion model's tokenizer was when it was trained)."""
    if given is not None:
        return Path(given)
    manifest_path = (store.manifest.get("tokenizer") or {}).get("path")
    candidates = [store.path / manifest_path] if manifest_path else []  # absolute stays so
    candidates.append(store.path / TOKENIZER_DIRNAME)
    if recorded:
        candidates.append(Path(recorded))
    for path in candidates:
        if path.exists():
            return path
    raise ValueError(
        f"{store.path}: no tokenizer (looked in {store.path / TOKENIZER_DIRNAME}); train one "
        "with `vqret tokenizer train --store ...` or pass --tokenizer PATH"
    )
