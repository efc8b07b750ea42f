"""The store: one Parquet row per image, a manifest, and the FAISS index beside them.

Layout of a store folder (default `<folder>/.vqret/`):

    manifest.json       model, dim, schema version, each table's live parts, next ids, failures
    images/*.parquet    immutable row files; together they are the image table (one row/image)
    texts/*.parquet     the text table: captions (sidecar files, `vqret index-texts`)
    images.faiss        the search index of each table, tagged in images.json / texts.json
    texts.faiss           with the store generation it covers
    recovery/<table>/   each part's rows without their vectors: a damaged part (told by the
                          size and checksum the manifest records) is re-embedded from them
    lock                held by the one writer

A commit writes new part files, then atomically replaces manifest.json (write + rename), then
deletes the parts it superseded. Readers read the manifest first and only the parts it lists,
so they always see the last committed state, and a writer killed at any moment leaves the
previous state readable. `images/` is a plain Parquet dataset: pandas, polars and duckdb read it
as it is (`pd.read_parquet("photos/.vqret/images")`).

Here: the reader, `Store`. The writer (lock, parts, commits) is store_writer.py; the names,
schemas and row <-> array helpers both share are store_layout.py. Everything is importable
from here as before.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write
from .lazy_import import lazy_import
from .model_spec import ModelSpec
from .part_health import DamagedPart, damaged_parts, mark_unreadable
from .store_layout import (
    COMPACT_ROWS,
    IMAGES,
    MANIFEST,
    METADATA_COLUMNS,
    READABLE_SCHEMA_VERSIONS,
    ROW_GROUP_ROWS,
    SCHEMA_VERSION,
    STORE_DIRNAME,
    TABLES,
    TEXTS,
    Failure,
    StoreError,
    StoreLockedError,
    conform,
    embeddings_from_arrow,
    embeddings_to_arrow,
    has_metadata,
    now_utc,
    row_schema,
    table_schema,
    text_schema,
)
from .store_writer import IdLog, StoreWriter
from .urls import is_url

# Everything a store's callers import from here, wherever it is defined: the layout and
# schemas (store_layout.py), the writer (store_writer.py), the atomic write (atomic.py,
# under the store's old name write_atomic).
__all__ = [
    "COMPACT_ROWS",
    "IMAGES",
    "MANIFEST",
    "METADATA_COLUMNS",
    "READABLE_SCHEMA_VERSIONS",
    "ROW_GROUP_ROWS",
    "SCHEMA_VERSION",
    "STORE_DIRNAME",
    "TABLES",
    "TEXTS",
    "Failure",
    "IdLog",
    "Store",
    "StoreError",
    "StoreLockedError",
    "StoreWriter",
    "conform",
    "embeddings_from_arrow",
    "embeddings_to_arrow",
    "find_store",
    "has_metadata",
    "now_utc",
    "row_schema",
    "table_schema",
    "text_schema",
    "write_atomic",
]

write_atomic = atomic_write

# ~0.1 s to import, and only id look-ups use it here: not a cold `vqret search`.
pc = lazy_import("pyarrow.compute")


def find_store(start: Path | None = None) -> Path | None:
    """The nearest `.vqret` store in `start` or its parents, like git finds `.git`."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / STORE_DIRNAME
        if (candidate / MANIFEST).is_file():
            return candidate
        if (folder / MANIFEST).is_file() and (folder / IMAGES).is_dir():
            return folder  # `start` is a store folder itself
    return None


class Store:
    """A store folder. Reading needs no lock; writing goes through `Store.writer()`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise StoreError(
                f"no vqret store at {self.path}: make one with `vqret index FOLDER`"
            )
        self.manifest = self._read_manifest()
        self._damage: dict[str, tuple[int, list[DamagedPart]]] = {}  # table -> (generation, parts)

    # ---- opening and creation -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Store:
        """A store by its folder or the folder it indexes, or (None) the nearest one from the
        current folder up. The one place a `--store` argument is turned into a store."""
        if path is None:
            found = find_store()
            if found is None:
                raise StoreError(
                    "no vqret store in this folder or its parents: run `vqret index FOLDER` "
                    "first, or pass --store PATH"
                )
            path = found
        path = Path(path)
        if not (path / MANIFEST).is_file() and (path / STORE_DIRNAME).is_dir():
            path = path / STORE_DIRNAME  # the indexed folder was given
        return cls(path)

    @classmethod
    def create(cls, path: Path | str, spec: ModelSpec, root: Path | str) -> Store:
        path = Path(path)
        for table in TABLES:
            (path / table).mkdir(parents=True, exist_ok=True)
        from vqret import __version__

        manifest = {
            "schema_version": SCHEMA_VERSION,
            "vqret_version": __version__,
            "created_at": now_utc().isoformat(),
            "updated_at": now_utc().isoformat(),
            "root": _root_for_manifest(root, path),
            "model": spec.to_dict(),
            "dim": spec.embed_dim,
            "generation": 0,
            "tables": {t: {"parts": [], "rows": 0, "next_id": 0} for t in TABLES},
            "failures": [],
        }
        atomic_write(path / MANIFEST, json.dumps(manifest, indent=2))
        return cls(path)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.path / MANIFEST}: unreadable manifest ({e})") from e
        version = manifest.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise StoreError(
                f"{self.path}: store schema version {version} is not one this vqret reads "
                f"({', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); re-index with --rebuild"
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
    def root_url(self) -> str | None:
        """The fsspec URL this store indexes (rows' paths are full URLs), or None: a folder."""
        root = self.manifest["root"]
        return root if is_url(root) else None

    @property
    def root(self) -> Path:
        """The indexed folder that the rows' paths are relative to."""
        if self.root_url is not None:
            raise StoreError(f"{self.path} indexes {self.root_url}, not a local folder")
        root = Path(self.manifest["root"])
        return root if root.is_absolute() else (self.path / root).resolve()

    @property
    def source(self) -> str:
        """What this store indexes, for people: the folder's path or the URL."""
        return self.root_url or str(self.root)

    @property
    def schema_version(self) -> int:
        """1: rows without the metadata columns (read as nulls until `vqret index` adds
        them); 2: with them (store_layout.SCHEMA_VERSION)."""
        return int(self.manifest["schema_version"])

    @property
    def failures(self) -> list[Failure]:
        return [Failure(**f) for f in self.manifest.get("failures", [])]

    def parts(self, table: str = IMAGES) -> list[str]:
        return list(self.manifest["tables"][table]["parts"])

    def table_generation(self, table: str = IMAGES) -> int:
        """The store generation at which `table` last changed."""
        return int(self.manifest["tables"][table].get("changed_at", 0))

    def count(self, table: str = IMAGES) -> int:
        return int(self.manifest["tables"][table]["rows"])

    def __len__(self) -> int:
        return self.count(IMAGES)

    # ---- reading --------------------------------------------------------------------------
    def read_table(self, columns: list[str] | None = None, table: str = IMAGES) -> pa.Table:
        """The committed rows of `table` (all parts the manifest lists), as one Arrow table.

        Always in the table's current schema: columns a part predates (an old store's, before
        `vqret index` upgrades it) are read as nulls."""
        schema = table_schema(table, self.dim)
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        for attempt in range(5):
            # damaged parts are skipped: their rows are missing until `vqret index` repairs
            bad = {d.part for d in self.damaged_parts(table)}
            parts = [self.path / table / name for name in self.parts(table) if name not in bad]
            try:
                tables = [t for t in (self._read_healthy(p, schema, table) for p in parts)
                          if t is not None]
                break
            except FileNotFoundError:
                # A writer committed and removed a part between our manifest read and now.
                time.sleep(0.05 * (attempt + 1))
                self.refresh()
        else:
            raise StoreError(f"{self.path}: parts keep changing under the reader; try again")
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables)

    def damaged_parts(self, table: str = IMAGES) -> list[DamagedPart]:
        """The parts of `table` whose file is missing, truncated or changed since it was
        written (part_health.py), checked once per store generation; every read skips them."""
        cached = self._damage.get(table)
        if cached is not None and cached[0] == self.generation:
            return cached[1]
        damaged = damaged_parts(self.path, self.manifest, table)
        if any(d.missing for d in damaged):
            generation = self.generation
            self.refresh()  # a writer may have replaced it since our manifest read
            if self.generation != generation:
                return self.damaged_parts(table)
        self._damage[table] = (self.generation, damaged)
        return damaged

    def _read_healthy(self, path: Path, schema: pa.Schema, table: str) -> pa.Table | None:
        """A part's rows, or None for one pyarrow can't read (then named as damaged)."""
        try:
            return _read_part(path, schema)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as e:
            cause = mark_unreadable(path, e)
            check = self.manifest["tables"][table].get("checks", {}).get(path.name) or {}
            self._damage[table] = (self.generation, [
                *self.damaged_parts(table), DamagedPart(table, path.name, cause, check.get("rows"))
            ])
            return None

    def read_part(
        self, part: str, columns: list[str] | None = None, table: str = IMAGES
    ) -> pa.Table:
        """One part's rows, in the table's current schema as read_table gives them."""
        schema = table_schema(table, self.dim)
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        return _read_part(self.path / table / part, schema)

    def vectors(self, table: str = IMAGES) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (N,), embeddings float32 (N, D)) of the committed rows of `table`."""
        rows = self.read_table(["id", "embedding"], table)
        ids = rows.column("id").to_numpy().astype(np.int64, copy=False)
        return ids, embeddings_from_arrow(rows.column("embedding"), self.dim)

    def rows_by_id(
        self, ids: Iterable[int], columns: list[str] | None = None, table: str = IMAGES
    ) -> dict[int, dict]:
        wanted = pa.array(list(ids), pa.int64())
        rows = self.read_table(columns, table)
        rows = rows.filter(pc.is_in(rows.column("id"), value_set=wanted))
        return {row["id"]: row for row in rows.to_pylist()}

    # ---- writing --------------------------------------------------------------------------
    def writer(self, wait: float = 0) -> StoreWriter:
        return StoreWriter(self, wait)


def _read_part(path: Path, schema: pa.Schema) -> pa.Table:
    """A part's columns of `schema`, the ones it predates as nulls."""
    # ParquetFile, not pq.read_table: that one goes through pyarrow.dataset, which imports
    # pandas (~0.6 s of a cold `vqret search`)
    part = pq.ParquetFile(path)
    held = set(part.schema_arrow.names)
    rows = part.read(columns=[name for name in schema.names if name in held])
    return conform(rows, schema)


def _root_for_manifest(root: Path | str, store: Path) -> str:
    if is_url(root):  # remote images (s3://bucket/prefix), local store: kept as given
        return root
    root, store = Path(root).resolve(), store.resolve()
    try:
        # A store inside its folder moves with it: keep the root relative.
        store.relative_to(root)
        return os.path.relpath(root, store)
    except ValueError:
        return str(root)
