"""The store: one Parquet row per image, a manifest, and the FAISS index beside them.

Layout of a store folder (default `<folder>/.vqret/`):

    manifest.json       model, dim, schema version, each table's live parts, next ids, failures
    images/*.parquet    immutable row files; together they are the image table (one row/image)
    texts/*.parquet     the text table: captions (sidecar files, `vqret index-texts`)
    images.faiss        the search index of each table, tagged in images.json / texts.json
    texts.faiss           with the store generation it covers
    lock                held by the one writer

A commit writes new part files, then atomically replaces manifest.json (write + rename), then
deletes the parts it superseded. Readers read the manifest first and only the parts it lists,
so they always see the last committed state, and a writer killed at any moment leaves the
previous state readable. `images/` is a plain Parquet dataset: pandas, polars and duckdb read it
as it is (`pd.read_parquet("photos/.vqret/images")`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write
from .lazy_import import lazy_import
from .model_spec import ModelSpec
from .urls import is_url

# The store's old name for it, kept for the modules that import it from here.
write_atomic = atomic_write

# ~0.1 s to import, and only writers and id look-ups use it: not a cold `vqret search`.
pc = lazy_import("pyarrow.compute")

SCHEMA_VERSION = 1
STORE_DIRNAME = ".vqret"
MANIFEST = "manifest.json"
IMAGES = "images"
TEXTS = "texts"
TABLES = (IMAGES, TEXTS)  # each table's parts live in a folder of the same name
# Parts smaller than this are merged at the end of an indexing run, so a collection built in
# many small commits doesn't end up as thousands of files.
COMPACT_ROWS = 100_000
# Rows per Parquet row group: a reader streaming a part (`iter_batches`, the sharded index
# build's tasks) decodes a whole row group at a time, and one row group per 100k-row part
# is ~200 MB of embeddings at d = 512.
ROW_GROUP_ROWS = 8192


class StoreError(RuntimeError):
    """A store that can't be opened, is locked, or doesn't fit the requested model."""


class StoreLockedError(StoreError):
    pass


def row_schema(dim: int) -> pa.Schema:
    """The image table: one row per image file."""
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
            # The VQ tokenizer's code grid (row-major, uint16) and the tokenizer's id; null
            # until `vqret tokenizer encode` has run with that tokenizer.
            pa.field("codes", pa.list_(pa.uint16())),
            pa.field("codes_tokenizer", pa.string()),
        ]
    )


def text_schema(dim: int) -> pa.Schema:
    """The text table: captions and other texts, searchable like images."""
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("source", pa.string()),  # sidecar path, or "file.csv:row"
            pa.field("image_id", pa.int64()),  # the image it describes, when known
            pa.field("hash", pa.string()),  # of (source, text): re-indexing skips what's known
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("added_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def table_schema(table: str, dim: int) -> pa.Schema:
    return row_schema(dim) if table == IMAGES else text_schema(dim)


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
        """The committed rows of `table` (all parts the manifest lists), as one Arrow table."""
        for attempt in range(5):
            parts = [self.path / table / name for name in self.parts(table)]
            try:
                # ParquetFile, not pq.read_table: that one goes through pyarrow.dataset,
                # which imports pandas (~0.6 s of a cold `vqret search`)
                tables = [pq.ParquetFile(p).read(columns=columns) for p in parts]
                break
            except FileNotFoundError:
                # A writer committed and removed a part between our manifest read and now.
                time.sleep(0.05 * (attempt + 1))
                self.refresh()
        else:
            raise StoreError(f"{self.path}: parts keep changing under the reader; try again")
        if not tables:
            schema = table_schema(table, self.dim)
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

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


class IdLog:
    """Ids a writer added or removed, kept as numpy chunks: 8 bytes an id where a Python set
    of the 100M ids of a first run would hold ~6 GB on the driver."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._count = 0

    def add(self, ids: np.ndarray) -> None:
        if len(ids):
            self._chunks.append(np.asarray(ids, np.int64))
            self._count += len(ids)

    def __len__(self) -> int:  # with repeats: what matters is whether there are any
        return self._count

    @staticmethod
    def union(*logs: IdLog) -> np.ndarray:
        chunks = [c for log in logs for c in log._chunks]
        return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64)


class StoreWriter:
    """The one writer of a store: holds the lock, commits parts and manifests atomically."""

    def __init__(self, store: Store, wait: float = 0):
        from filelock import FileLock, Timeout

        self.store = store
        self._lock = FileLock(str(store.path / "lock"))
        try:
            self._lock.acquire(timeout=wait)
        except Timeout:
            holder = _read_holder(store.path / "writer.pid")
            raise StoreLockedError(
                f"{store.path}: another writer{holder} is writing to this store; wait for "
                "it to finish or pass --wait SECONDS"
            ) from None
        (store.path / "writer.pid").write_text(f"{os.getpid()}\t{_this_command()}")
        store.refresh()
        self._remove_leftovers()
        self._part_ids: dict[tuple[str, str], np.ndarray] = {}
        # What this writer changed, so the search index can be updated instead of rebuilt.
        self.start_generation = {t: store.table_generation(t) for t in TABLES}
        self.added: dict[str, IdLog] = {t: IdLog() for t in TABLES}
        self.removed: dict[str, IdLog] = {t: IdLog() for t in TABLES}

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
        for table in TABLES:
            folder = self.store.path / table
            folder.mkdir(exist_ok=True)
            live = set(self.store.parts(table))
            for f in folder.iterdir():
                if f.name not in live:
                    f.unlink(missing_ok=True)
        for f in self.store.path.glob(".tmp-*"):
            f.unlink(missing_ok=True)

    def _ids_of(self, table: str, part: str) -> np.ndarray:
        key = (table, part)
        if key not in self._part_ids:
            rows = pq.read_table(self.store.path / table / part, columns=["id"])
            self._part_ids[key] = rows.column("id").to_numpy()
        return self._part_ids[key]

    def changed_ids(self, table: str = IMAGES) -> np.ndarray:
        """The ids this writer added, replaced or removed in `table`, sorted, each once."""
        return IdLog.union(self.added[table], self.removed[table])

    def allocate_ids(self, n: int, table: str = IMAGES) -> np.ndarray:
        """Fresh ids, never handed out before in this store (committed with the next commit)."""
        entry = self.manifest["tables"][table]
        start = int(entry["next_id"])
        entry["next_id"] = start + n
        return np.arange(start, start + n, dtype=np.int64)

    def _write_part(self, table: str, rows: pa.Table) -> str:
        name = f"part-{self.store.generation + 1:06d}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.store.path / table / name
        atomic_write(
            final,
            lambda tmp: pq.write_table(
                rows, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS
            ),
        )
        self._part_ids[(table, name)] = rows.column("id").to_numpy()
        return name

    def commit(
        self,
        add: pa.Table | None = None,
        remove_ids: Iterable[int] = (),
        failures: list[Failure] | None = None,
        table: str = IMAGES,
        **manifest_updates: Any,
    ) -> None:
        """Atomically add rows to `table` and drop rows by id (replace = drop + add)."""
        remove = np.fromiter(remove_ids, dtype=np.int64)
        self.removed[table].add(remove)
        new_parts: list[str] = []
        superseded: list[str] = []
        rows = self.store.count(table)
        for part in self.store.parts(table):
            ids = self._ids_of(table, part)
            hit = np.isin(ids, remove) if len(remove) else np.zeros(len(ids), bool)
            if not hit.any():
                new_parts.append(part)
                continue
            superseded.append(part)
            rows -= int(hit.sum())
            if hit.all():
                continue
            kept = pq.read_table(self.store.path / table / part).filter(pa.array(~hit))
            new_parts.append(self._write_part(table, kept))
        if add is not None and add.num_rows:
            schema = table_schema(table, self.store.dim)
            for field in schema:  # columns the caller leaves out are null (e.g. codes)
                if field.name not in add.column_names:
                    add = add.append_column(field, pa.nulls(add.num_rows, field.type))
            new_parts.append(self._write_part(table, add.select(schema.names).cast(schema)))
            rows += add.num_rows
            self.added[table].add(add.column("id").to_numpy())
        self._publish(table, new_parts, superseded, rows, failures, manifest_updates)

    def update_columns(
        self, rows: pa.Table, table: str = IMAGES, **manifest_updates: Any
    ) -> int:
        """Set columns of existing rows, by id, in one atomic commit; returns the rows updated.

        `rows` holds an `id` column and the columns to set (e.g. codes, codes_tokenizer).
        The parts holding those ids are rewritten with the new values, rows keep their ids
        and order, ids not in the table are ignored. Ids and embeddings can't be set here:
        since the vectors stay the same, the table's search index stays valid (its
        `changed_at` generation is kept) and nothing has to be re-added to FAISS.
        """
        schema = table_schema(table, self.store.dim)
        columns = [c for c in rows.column_names if c != "id"]
        if "id" not in rows.column_names or not columns:
            raise ValueError("update_columns needs an id column and at least one other")
        frozen = {"embedding"} & set(columns)
        unknown = [c for c in columns if c not in schema.names]
        if frozen or unknown:
            raise ValueError(
                f"update_columns can't set {sorted(frozen) + unknown}: ids and embeddings "
                "change through commit(), and only columns of the table exist"
            )
        ids = rows.column("id").combine_chunks().cast(pa.int64())
        if len(pc.unique(ids)) != len(ids):
            raise ValueError("update_columns: an id appears twice")
        values = rows.select(columns).cast(pa.schema([schema.field(c) for c in columns]))
        wanted = ids.to_numpy()
        new_parts, superseded, updated = [], [], 0
        for part in self.store.parts(table):
            if not np.isin(self._ids_of(table, part), wanted).any():
                new_parts.append(part)
                continue
            data = pq.read_table(self.store.path / table / part)
            position = pc.index_in(data.column("id"), value_set=ids)  # null: not updated
            hit = pc.is_valid(position)
            take = pc.fill_null(position, 0)
            for c in columns:
                new = pc.if_else(hit, values.column(c).take(take), data.column(c))
                data = data.set_column(data.schema.get_field_index(c), schema.field(c), new)
            updated += pc.sum(hit.cast(pa.int64())).as_py()
            superseded.append(part)
            new_parts.append(self._write_part(table, data))
        self._publish(
            table, new_parts, superseded, self.store.count(table), None, manifest_updates,
            vectors_changed=False,
        )
        return updated

    def compact(self, table: str = IMAGES, max_rows: int = COMPACT_ROWS) -> None:
        """Merge small parts (fewer than max_rows rows together) into one."""
        parts = self.store.parts(table)
        merged: list[str] = []
        total = 0
        for p in parts:
            n = len(self._ids_of(table, p))
            if n < max_rows and total + n <= max_rows:
                merged.append(p)
                total += n
        if len(merged) < 2:
            return
        rows = pa.concat_tables([pq.read_table(self.store.path / table / p) for p in merged])
        kept = [p for p in parts if p not in merged]
        new = self._write_part(table, rows)
        self._publish(table, kept + [new], merged, self.store.count(table), None, {})

    def _publish(
        self, table, parts, superseded, rows, failures, updates, vectors_changed: bool = True
    ) -> None:
        manifest = json.loads(json.dumps(self.manifest))  # deep copy: readers share none of it
        manifest.update(updates)
        entry = manifest["tables"][table]
        manifest["generation"] = self.store.generation + 1
        if vectors_changed and parts != entry["parts"]:
            # the last generation that changed this table's rows or vectors: its index
            # stays valid until then (update_columns leaves both alone)
            entry["changed_at"] = manifest["generation"]
        entry.update(parts=parts, rows=rows)
        manifest["updated_at"] = now_utc().isoformat()
        if failures is not None:
            manifest["failures"] = [f.to_dict() for f in failures]
        atomic_write(self.store.path / MANIFEST, json.dumps(manifest, indent=2))
        self.store.manifest = manifest
        for part in superseded:
            (self.store.path / table / part).unlink(missing_ok=True)
            self._part_ids.pop((table, part), None)


def _this_command() -> str:
    """What this process is, for the message another writer gets: `vqret tokenizer encode`,
    `vqret index`, or the program's name (a script using the Python API)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if program.name != "vqret" and program.parts[-2:] != ("cli", "main.py"):
        return program.name
    words = []
    for arg in sys.argv[1:3]:
        if not arg.replace("-", "").isalpha() or arg.startswith("-"):
            break  # a folder, a query or an option: the command's name is complete
        words.append(arg)
    return " ".join(["vqret", *words])


def _read_holder(path: Path) -> str:
    """' (`vqret index`, pid 123)' from writer.pid, or '' when it can't be read."""
    try:
        pid, _, command = path.read_text().strip().partition("\t")
    except OSError:
        return ""
    if not pid:
        return ""
    return f" (`{command}`, pid {pid})" if command else f" (pid {pid})"
