"""Code grids in the store: encode every image row once per tokenizer, read them back.

Each image row gets `codes` (its code grid, row-major, uint16) and `codes_tokenizer` (the id
of the tokenizer that made it). The grid's shape is the tokenizer's (grid_size x grid_size);
the store's manifest also records it under "tokenizer", with the checkpoint's path, so that
`decode` and `dupes` find the tokenizer without being told.

Encoding is incremental like `vqret index`: rows that already hold codes from this tokenizer
are skipped, so a run after `vqret index` only encodes new and modified files (the indexer
keeps codes on renames and copies, and drops them when a file's content changes). Rows are
updated in place through `StoreWriter.update_columns` under the store's writer lock, in
commits every 30 s (or 65,536 rows), so a killed run keeps what it committed and the search
index is never touched (the embeddings don't change).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from vqret.retrieval.content_hash import unreadable
from vqret.retrieval.images import ImageLoadError
from vqret.retrieval.store import Failure, Store, StoreError

from .checkpoint import resolve_checkpoint, tokenizer_id

if TYPE_CHECKING:  # torch: only once an image is to be encoded (`pending_codes`)
    from .api import Tokenizer

__all__ = [
    "TOKENIZER_DIRNAME",
    "EncodeReport",
    "decode_row",
    "encode_store",
    "find_row",
    "stored_codes",
    "store_tokenizer_path",
]

# The store's own tokenizer: `vqret tokenizer train --store S` writes it here by default.
TOKENIZER_DIRNAME = "tokenizer"
# A commit rewrites the parts holding the rows (~5 s for a 100k-row part of 512-d rows):
# commit at most this often, and never spend more than a sixth of the run committing.
COMMIT_ROWS = 65536
COMMIT_SECONDS = 30.0
COMMIT_SHARE = 5.0  # wait at least this many times the last commit's cost between commits

ProgressCallback = Callable[[int, int], None]  # (rows done, rows to encode)


@dataclass
class EncodeReport:
    tokenizer: str  # the tokenizer's id
    grid: tuple[int, int]
    encoded: int = 0
    skipped: int = 0  # rows that already had codes from this tokenizer
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer,
            "grid": list(self.grid),
            "encoded": self.encoded,
            "skipped": self.skipped,
            "failed": [f.to_dict() for f in self.failed],
            "seconds": round(self.seconds, 3),
        }


def pending_codes(store: Store, checkpoint: str | os.PathLike[str] | None = None
                  ) -> EncodeReport | None:
    """The report of an `encode_store` run with nothing to do, found without torch or the
    tokenizer's weights: every row has codes from the tokenizer `checkpoint` (default: the
    store's) names. None when some row still needs them (or the grid isn't recorded)."""
    started = time.perf_counter()
    tok_id = tokenizer_id(store_tokenizer_path(store, checkpoint))
    record = store.manifest.get("tokenizer") or {}
    if record.get("id") != tok_id or not record.get("grid"):
        return None
    rows = store.read_table(["codes_tokenizer"])
    if not rows.num_rows or rows.column("codes_tokenizer").null_count:
        return None
    if pc.any(pc.not_equal(rows.column("codes_tokenizer"), tok_id)).as_py():
        return None
    grid = tuple(int(g) for g in record["grid"])
    return EncodeReport(tok_id, (grid[0], grid[1]), skipped=rows.num_rows,
                        seconds=time.perf_counter() - started)


def store_tokenizer_path(
    store: Store,
    given: str | os.PathLike[str] | None = None,
    recorded: str | os.PathLike[str] | None = None,
) -> Path:
    """The tokenizer checkpoint to use with `store`: `given`, else the one the store's codes
    were last made with (manifest), else STORE/tokenizer, else `recorded` (e.g. where a
    diffusion model's tokenizer was when the model was trained)."""
    if given is not None:
        return Path(given)
    in_manifest = (store.manifest.get("tokenizer") or {}).get("path")
    candidates = [store.path / in_manifest] if in_manifest else []  # absolute stays absolute
    candidates.append(store.path / TOKENIZER_DIRNAME)
    if recorded:
        candidates.append(Path(recorded))
    for path in candidates:
        try:
            resolve_checkpoint(path)
            return path
        except ValueError:
            continue
    raise StoreError(
        f"{store.path} has no tokenizer: train one with `vqret tokenizer train --store "
        f"{store.path}` or pass --tokenizer CHECKPOINT"
    )


def _manifest_record(store: Store, tokenizer: Tokenizer) -> dict[str, Any]:
    path_text = None
    if tokenizer.path is not None:  # the weights file
        weights = tokenizer.path.resolve()
        try:  # inside the store: relative, so the store can move with it
            path_text = str(weights.relative_to(store.path.resolve()))
        except ValueError:
            path_text = str(weights)
    return {
        "id": tokenizer.id,
        "path": path_text,
        "grid": [tokenizer.grid_size, tokenizer.grid_size],
        "image_size": tokenizer.image_size,
        "num_codes": tokenizer.num_codes,
    }


def encode_store(
    store: Store,
    tokenizer: Tokenizer,
    *,
    wait: float = 0,
    commit_every: int = COMMIT_ROWS,
    commit_seconds: float = COMMIT_SECONDS,
    decode_threads: int = 4,
    on_progress: ProgressCallback | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> EncodeReport:
    """Write `tokenizer`'s code grid into every image row that lacks one from it.

    Unreadable files are reported (to `on_failure` and in the report) and skipped; their
    rows keep whatever they had. Raises StoreLockedError when another writer holds the
    store (after `wait` seconds).
    """
    if tokenizer.id is None:
        raise ValueError("the tokenizer has no id: load it from a checkpoint (Tokenizer.load)")
    g = tokenizer.grid_size
    report = EncodeReport(tokenizer.id, (g, g))
    started = time.perf_counter()
    with store.writer(wait) as writer:
        # Read under the lock: no `vqret index` can change the rows while we work on them.
        rows = store.read_table(["id", "path", "codes_tokenizer"])
        done_mask = pc.fill_null(pc.equal(rows.column("codes_tokenizer"), tokenizer.id), False)
        todo = rows.filter(pc.invert(done_mask))
        report.skipped = rows.num_rows - todo.num_rows
        ids = todo.column("id").to_pylist()
        paths = todo.column("path").to_pylist()
        total = len(ids)
        if on_progress:
            on_progress(0, total)
        record = _manifest_record(store, tokenizer)
        pending_ids: list[int] = []
        pending_codes: list[np.ndarray] = []
        last_commit = time.monotonic()
        commit_cost = 0.0

        def flush() -> None:
            nonlocal last_commit, commit_cost
            if not pending_ids:
                return
            began = time.monotonic()
            flat = np.concatenate(pending_codes).reshape(len(pending_ids), g * g)
            update = pa.table(
                {
                    "id": pa.array(pending_ids, pa.int64()),
                    "codes": pa.ListArray.from_arrays(
                        pa.array(np.arange(0, flat.size + 1, g * g, dtype=np.int32)),
                        pa.array(flat.reshape(-1), pa.uint16()),
                    ),
                    "codes_tokenizer": pa.array([tokenizer.id] * len(pending_ids), pa.string()),
                }
            )
            writer.update_columns(update, tokenizer=record)
            pending_ids.clear()
            pending_codes.clear()
            last_commit = time.monotonic()
            commit_cost = last_commit - began

        from .data import center_square

        def load(path: str) -> np.ndarray | str:
            try:
                return center_square(str(store.root / path), tokenizer.image_size)
            except ImageLoadError as err:
                return err.cause
            except OSError as err:  # e.g. the file vanished since `vqret index`
                return unreadable(err)

        batch = max(1, tokenizer.batch_size)
        with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool:
            # decoding the next batch overlaps with encoding this one
            upcoming = pool.map(load, paths[:batch]) if total else None
            for start in range(0, total, batch):
                loaded = list(upcoming)
                following = paths[start + batch : start + 2 * batch]
                upcoming = pool.map(load, following) if following else None
                arrays, kept = [], []
                for i, result in enumerate(loaded):
                    if isinstance(result, str):
                        failure = Failure(paths[start + i], result)
                        report.failed.append(failure)
                        if on_failure:
                            on_failure(failure)
                    else:
                        arrays.append(result)
                        kept.append(ids[start + i])
                if arrays:
                    import torch

                    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
                    pending_codes.append(tokenizer.encode(pixels))
                    pending_ids.extend(kept)
                    report.encoded += len(kept)
                if on_progress:
                    on_progress(min(start + batch, total), total)
                since = time.monotonic() - last_commit
                due = since > max(commit_seconds, COMMIT_SHARE * commit_cost)
                if len(pending_ids) >= commit_every or due:
                    flush()
        flush()
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------------------------------
# Reading codes back
# ------------------------------------------------------------------------------------------


def find_row(
    store: Store, *, id: int | None = None, path: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """The image row (id, path, codes, codes_tokenizer) for an id, or for a path: as stored
    (relative to the indexed folder) or a file on disk under it."""
    if (id is None) == (path is None):
        raise ValueError("give exactly one of an id or a path")
    columns = ["id", "path", "codes", "codes_tokenizer"]
    rows = store.read_table(columns)
    if id is not None:
        found = rows.filter(pc.equal(rows.column("id"), id))
        what = f"id {id}"
    else:
        candidates = {str(path).replace(os.sep, "/")}
        try:
            candidates.add(Path(path).resolve().relative_to(store.root).as_posix())
        except ValueError:
            pass  # not under the indexed folder: only the stored form can match
        found = rows.filter(pc.is_in(rows.column("path"), pa.array(sorted(candidates))))
        what = f"path {path}"
    if found.num_rows == 0:
        raise StoreError(f"{store.path}: no image with {what}")
    return found.slice(0, 1).to_pylist()[0]


def stored_codes(row: dict[str, Any], tokenizer: Tokenizer) -> np.ndarray:
    """A row's codes as a (grid, grid) uint16 array, checked against `tokenizer`."""
    name = f"image {row['id']} ({row['path']})"
    if row["codes"] is None:
        raise StoreError(f"{name} has no codes yet: run `vqret tokenizer encode` first")
    if row["codes_tokenizer"] != tokenizer.id:
        where = f" ({tokenizer.path})" if tokenizer.path is not None else ""
        raise StoreError(
            f"{name} was encoded by tokenizer {str(row['codes_tokenizer'])[:12]}, not by "
            f"{str(tokenizer.id)[:12]}{where}: pass --tokenizer with the checkpoint that made "
            "its codes, or run `vqret tokenizer encode` again with this one"
        )
    g = tokenizer.grid_size
    codes = np.asarray(row["codes"], dtype=np.uint16)
    if codes.size != g * g:
        raise StoreError(f"{name} has {codes.size} codes, not the {g}x{g} grid of its tokenizer")
    return codes.reshape(g, g)


def decode_row(
    store: Store,
    tokenizer: Tokenizer,
    *,
    id: int | None = None,
    path: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """The picture rebuilt from a row's stored codes: uint8 (S, S, 3)."""
    row = find_row(store, id=id, path=path)
    return tokenizer.decode(stored_codes(row, tokenizer))[0]
