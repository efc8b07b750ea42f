"""The one writer of a store: the lock, part files, and the manifest commit.

A commit writes new part files, then atomically replaces manifest.json, then deletes the
parts it superseded (see store.py for the layout and what readers see). A writer started
after a killed one removes what that one left: parts no manifest lists, ".tmp-" files.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write
from .lazy_import import lazy_import
from .part_health import forget_parts, kept_checks, remove_stray_recovery, write_part_extras
from .store_layout import (
    COMPACT_ROWS,
    IMAGES,
    MANIFEST,
    ROW_GROUP_ROWS,
    TABLES,
    Failure,
    StoreError,
    StoreLockedError,
    conform,
    now_utc,
    table_schema,
)

if TYPE_CHECKING:
    from .store import Store

# ~0.1 s to import, and only writers use it: not a cold `vqret search`.
pc = lazy_import("pyarrow.compute")

__all__ = ["IdLog", "StoreWriter"]


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
        try:
            (store.path / "writer.pid").write_text(f"{os.getpid()}\t{_this_command()}")
            store.refresh()
            self._remove_leftovers()
        except BaseException:  # a full or read-only disk: the lock must not outlive us
            self._lock.release()
            raise
        self._part_ids: dict[tuple[str, str], np.ndarray] = {}
        self._checks: dict[str, dict[str, dict]] = {t: {} for t in TABLES}  # parts written
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
            remove_stray_recovery(self.store.path, table, live)
        for f in self.store.path.glob(".tmp-*"):
            f.unlink(missing_ok=True)

    def _ids_of(self, table: str, part: str) -> np.ndarray:
        key = (table, part)
        if key not in self._part_ids:
            if any(d.part == part for d in self.store.damaged_parts(table)):
                raise StoreError(f"{self.store.path / table / part} is damaged: run `vqret "
                                 "index` to repair it first")
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
        # size + checksum for the manifest, and the rows without vectors (part_health.py)
        self._checks[table][name] = write_part_extras(self.store.path, table, name, rows)
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
            data = conform(pq.read_table(self.store.path / table / part), schema)
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

    def set_part_columns(
        self, part: str, columns: dict[str, pa.Array], table: str = IMAGES,
        **manifest_updates: Any,
    ) -> None:
        """Set columns of every row of one part (values in its row order), adding columns the
        part predates, in one atomic commit: the part is rewritten in its place in the list,
        its ids and embeddings copied as they are, so the search index stays valid. The
        schema upgrade of an old store (Indexer) goes a part at a time through here: a run
        killed halfway keeps the parts done."""
        schema = table_schema(table, self.store.dim)
        frozen = {"id", "embedding"} & set(columns)
        unknown = [c for c in columns if c not in schema.names]
        if frozen or unknown:
            raise ValueError(f"set_part_columns can't set {sorted(frozen) + unknown}")
        data = conform(pq.read_table(self.store.path / table / part), schema)
        for name, values in columns.items():
            if len(values) != data.num_rows:
                raise ValueError(f"set_part_columns: {len(values)} values of {name} for "
                                 f"{data.num_rows} rows")
            field = schema.field(name)
            data = data.set_column(schema.get_field_index(name), field, values.cast(field.type))
        new = self._write_part(table, data)
        parts = [new if p == part else p for p in self.store.parts(table)]
        self._publish(table, parts, [part], self.store.count(table), None, manifest_updates,
                      vectors_changed=False)

    def replace_part(self, part: str, rows: pa.Table | None, lost_rows: int,
                     removed_ids: np.ndarray, table: str = IMAGES) -> None:
        """Put `rows` (or nothing) in place of a damaged part, in one commit, without reading
        it: `lost_rows` is how many rows it held, `removed_ids` their ids when known (the
        search index drops them). repair.py re-embeds a damaged part through here."""
        parts = self.store.parts(table)
        if rows is not None and rows.num_rows:
            schema = table_schema(table, self.store.dim)
            new = self._write_part(table, conform(rows, schema))
            parts = [new if p == part else p for p in parts]
            self.added[table].add(rows.column("id").to_numpy())
        else:
            parts = [p for p in parts if p != part]
        self.removed[table].add(removed_ids)
        count = self.store.count(table) - lost_rows + (rows.num_rows if rows is not None else 0)
        self._publish(table, parts, [part], count, None, {})

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
        schema = table_schema(table, self.store.dim)  # an old part's missing columns: nulls
        rows = pa.concat_tables(
            [conform(pq.read_table(self.store.path / table / p), schema) for p in merged]
        )
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
        entry["checks"] = kept_checks(entry.get("checks"), parts, self._checks[table])
        manifest["updated_at"] = now_utc().isoformat()
        if failures is not None:
            manifest["failures"] = [f.to_dict() for f in failures]
        atomic_write(self.store.path / MANIFEST, json.dumps(manifest, indent=2))
        self.store.manifest = manifest
        for part in superseded:
            (self.store.path / table / part).unlink(missing_ok=True)
            self._part_ids.pop((table, part), None)
        forget_parts(self.store.path, table, superseded)


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
