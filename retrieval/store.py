"""The store: one Parquet row per image, a manifest, and the FAISS index beside them.

Layout of a store folder (default `<folder>/.vqret/`):

    manifest.json       model, dim, schema version, the list of live parts, next id, failures
    parts/*.parquet     immutable row files; together they are the collection's table
    index.faiss         the search index, tagged in index.json with the generation it covers
    model-config.json   the open_clip config when the model came from a file
    lock                held by the one writer

A commit writes new part files, then atomically replaces manifest.json (write + rename), then
deletes the parts it superseded. Readers read the manifest first and only the parts it lists,
so they always see the last committed state, and a writer killed at any moment leaves the
previous state readable. `parts/` is a plain Parquet dataset: pandas, polars and duckdb read it
as it is (`pd.read_parquet("photos/.vqret/parts")`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .embedder import ModelSpec

SCHEMA_VERSION = 1
STORE_DIRNAME = ".vqret"
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
# Parts smaller than this are merged at the end of an indexing run, so a collection built in
# many small commits doesn't end up as thousands of files.
COMPACT_ROWS = 100_000


class StoreError(RuntimeError):
    """A store that can't be opened, is locked, or doesn't fit the requested model."""


class StoreLockedError(StoreError):
    pass


def row_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),  # relative to the indexed folder
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("hash", pa.string()),  # blake2b-128 of the file's bytes
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("added_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def embeddings_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def embeddings_from_arrow(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """(N, dim) float32 view of a fixed-size-list column, copying only across chunks."""
    if isinstance(column, pa.ChunkedArray):
        chunks = column.chunks
    else:
        chunks = [column]
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    flat = [c.flatten().to_numpy(zero_copy_only=False) for c in chunks]
    return np.concatenate(flat).reshape(-1, dim) if len(flat) > 1 else flat[0].reshape(-1, dim)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_store(start: Path | None = None) -> Path | None:
    """The nearest `.vqret` store in `start` or its parents, like git finds `.git`."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / STORE_DIRNAME
        if (candidate / MANIFEST).is_file():
            return candidate
        if (folder / MANIFEST).is_file() and (folder / PARTS_DIR).is_dir():
            return folder  # `start` is a store folder itself
    return None


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Failure:
    path: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}


class Store:
    """A store folder. Reading needs no lock; writing goes through `Store.writer()`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise StoreError(
                f"no vqret store at {self.path}: make one with `vqret index FOLDER`"
            )
        self.manifest = self._read_manifest()

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path | str, spec: ModelSpec, root: Path | str) -> Store:
        path = Path(path)
        (path / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        from vqret import __version__

        manifest = {
            "schema_version": SCHEMA_VERSION,
            "vqret_version": __version__,
            "created_at": now_utc().isoformat(),
            "updated_at": now_utc().isoformat(),
            "root": _root_for_manifest(Path(root), path),
            "model": spec.to_dict(),
            "dim": spec.embed_dim,
            "generation": 0,
            "next_id": 0,
            "parts": [],
            "rows": 0,
            "failures": [],
        }
        write_atomic(path / MANIFEST, json.dumps(manifest, indent=2).encode())
        return cls(path)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.path / MANIFEST}: unreadable manifest ({e})") from e
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: store schema version {version} is not the {SCHEMA_VERSION} this "
                "vqret reads; re-index with --rebuild"
            )
        return manifest

    def refresh(self) -> None:
        self.manifest = self._read_manifest()

    # ---- facts ----------------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.manifest["model"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def root(self) -> Path:
        """The indexed folder that the rows' paths are relative to."""
        root = Path(self.manifest["root"])
        return root if root.is_absolute() else (self.path / root).resolve()

    @property
    def failures(self) -> list[Failure]:
        return [Failure(**f) for f in self.manifest.get("failures", [])]

    def __len__(self) -> int:
        return int(self.manifest.get("rows", 0))

    # ---- reading --------------------------------------------------------------------------
    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """The committed rows (all parts the manifest lists), as one Arrow table."""
        for attempt in range(5):
            parts = [self.path / PARTS_DIR / name for name in self.manifest["parts"]]
            try:
                tables = [pq.read_table(p, columns=columns) for p in parts]
                break
            except FileNotFoundError:
                # A writer committed and removed a part between our manifest read and now.
                time.sleep(0.05 * (attempt + 1))
                self.refresh()
        else:
            raise StoreError(f"{self.path}: parts keep changing under the reader; try again")
        if not tables:
            schema = row_schema(self.dim)
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (N,), embeddings float32 (N, D)) of the committed rows."""
        table = self.read_table(["id", "embedding"])
        ids = table.column("id").to_numpy().astype(np.int64, copy=False)
        return ids, embeddings_from_arrow(table.column("embedding"), self.dim)

    def rows_by_id(self, ids: Iterable[int], columns: list[str] | None = None) -> dict[int, dict]:
        wanted = pa.array(list(ids), pa.int64())
        table = self.read_table(columns)
        table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
        return {row["id"]: row for row in table.to_pylist()}

    # ---- writing --------------------------------------------------------------------------
    def writer(self, wait: float = 0) -> StoreWriter:
        return StoreWriter(self, wait)


def _root_for_manifest(root: Path, store: Path) -> str:
    root, store = root.resolve(), store.resolve()
    try:
        # A store inside its folder moves with it: keep the root relative.
        store.relative_to(root)
        return os.path.relpath(root, store)
    except ValueError:
        return str(root)


class StoreWriter:
    """The one writer of a store: holds the lock, commits parts and manifests atomically."""

    def __init__(self, store: Store, wait: float = 0):
        from filelock import FileLock, Timeout

        self.store = store
        self._lock = FileLock(str(store.path / "lock"))
        try:
            self._lock.acquire(timeout=wait)
        except Timeout:
            holder = _read_pid(store.path / "writer.pid")
            who = f" (pid {holder})" if holder else ""
            raise StoreLockedError(
                f"{store.path}: another `vqret index`{who} is writing to this store; wait for "
                "it to finish or pass --wait SECONDS"
            ) from None
        (store.path / "writer.pid").write_text(str(os.getpid()))
        store.refresh()
        self._remove_leftovers()
        self._part_ids: dict[str, np.ndarray] = {}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._lock.is_locked:
            try:
                (self.store.path / "writer.pid").unlink(missing_ok=True)
            finally:
                self._lock.release()

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    def _remove_leftovers(self) -> None:
        """Parts and temp files of a writer that was killed before it committed them."""
        live = set(self.manifest["parts"])
        for f in (self.store.path / PARTS_DIR).iterdir():
            if f.name not in live:
                f.unlink(missing_ok=True)
        for f in self.store.path.glob(".tmp-*"):
            f.unlink(missing_ok=True)

    def _ids_of(self, part: str) -> np.ndarray:
        if part not in self._part_ids:
            table = pq.read_table(self.store.path / PARTS_DIR / part, columns=["id"])
            self._part_ids[part] = table.column("id").to_numpy()
        return self._part_ids[part]

    def allocate_ids(self, n: int) -> np.ndarray:
        start = int(self.manifest["next_id"])
        self.manifest["next_id"] = start + n
        return np.arange(start, start + n, dtype=np.int64)

    def _write_part(self, table: pa.Table) -> str:
        name = f"part-{self.store.generation + 1:06d}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.store.path / PARTS_DIR / name
        tmp = final.with_name(f".tmp-{name}")
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._part_ids[name] = table.column("id").to_numpy()
        return name

    def commit(
        self,
        add: pa.Table | None = None,
        remove_ids: Iterable[int] = (),
        failures: list[Failure] | None = None,
        **manifest_updates: Any,
    ) -> None:
        """Atomically add rows and drop rows by id (a replaced row is dropped and re-added)."""
        remove = np.fromiter(remove_ids, dtype=np.int64)
        parts = list(self.manifest["parts"])
        new_parts: list[str] = []
        superseded: list[str] = []
        rows = int(self.manifest["rows"])
        for part in parts:
            ids = self._ids_of(part)
            hit = np.isin(ids, remove) if len(remove) else np.zeros(len(ids), bool)
            if not hit.any():
                new_parts.append(part)
                continue
            superseded.append(part)
            rows -= int(hit.sum())
            if hit.all():
                continue
            table = pq.read_table(self.store.path / PARTS_DIR / part)
            new_parts.append(self._write_part(table.filter(pa.array(~hit))))
        if add is not None and add.num_rows:
            new_parts.append(self._write_part(add.cast(row_schema(self.store.dim))))
            rows += add.num_rows
        self._publish(new_parts, superseded, rows, failures, manifest_updates)

    def compact(self, max_rows: int = COMPACT_ROWS) -> None:
        """Merge small parts (fewer than max_rows rows together) into one."""
        parts = list(self.manifest["parts"])
        small = [p for p in parts if len(self._ids_of(p)) < max_rows]
        if len(small) < 2:
            return
        merged: list[str] = []
        total = 0
        for p in small:
            if total + len(self._ids_of(p)) > max_rows and merged:
                break
            merged.append(p)
            total += len(self._ids_of(p))
        if len(merged) < 2:
            return
        table = pa.concat_tables(
            [pq.read_table(self.store.path / PARTS_DIR / p) for p in merged]
        )
        kept = [p for p in parts if p not in merged]
        new = self._write_part(table)
        self._publish(kept + [new], merged, int(self.manifest["rows"]), None, {})

    def _publish(self, parts, superseded, rows, failures, updates) -> None:
        manifest = dict(self.manifest)
        manifest.update(updates)
        manifest["parts"] = parts
        manifest["rows"] = rows
        manifest["generation"] = self.store.generation + 1
        manifest["updated_at"] = now_utc().isoformat()
        if failures is not None:
            manifest["failures"] = [f.to_dict() for f in failures]
        write_atomic(self.store.path / MANIFEST, json.dumps(manifest, indent=2).encode())
        self.store.manifest = manifest
        for part in superseded:
            (self.store.path / PARTS_DIR / part).unlink(missing_ok=True)
            self._part_ids.pop(part, None)


def _read_pid(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
