"""Incremental indexing: bring a store's rows in line with a folder, touching only what changed.

Per file, cheapest test first (as rclip does, but with a whole-file hash):
1. same path, same size and mtime            -> unchanged, nothing read
2. same path, same content hash              -> unchanged (only size/mtime refreshed)
3. content hash of a row whose file is gone  -> renamed: the row keeps its id and embedding
4. content hash of another live row          -> duplicate: new id, embedding copied
5. anything else                             -> decoded and embedded (added, or updated in place)
Rows of files no longer present are removed. Metadata-only changes are committed first, then
embeddings in batches, so a run killed at any point loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .embedder import Embedder
from .index import update_after_write
from .remote import FsspecSource, is_url
from .store import (
    IMAGES,
    TEXTS,
    Failure,
    Store,
    StoreWriter,
    embeddings_from_arrow,
    embeddings_to_arrow,
    now_utc,
    row_schema,
)
from .texts import is_sidecar, sidecar_rows, sync_texts
from .walk import FileEntry, walk_images

ProgressCallback = Callable[[int, int], None]  # (images embedded so far, images to embed)


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    renamed: int = 0
    unchanged: int = 0
    embedded: int = 0  # images that went through the model
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)  # the search index's plan
    texts: dict[str, Any] = field(default_factory=dict)  # sidecar captions: added, removed...

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "renamed": self.renamed,
            "unchanged": self.unchanged,
            "embedded": self.embedded,
            "failed": [f.to_dict() for f in self.failed],
            "texts": {k: v for k, v in self.texts.items() if k != "failed"},
            "seconds": round(self.seconds, 3),
            "index": {k: self.index.get(k) for k in ("kind", "factory", "params", "recall_at_10")},
        }


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """blake2b-128 of the whole file: renames and copies are recognised by content."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _os_cause(e: OSError) -> str:
    return f"unreadable ({e.strerror or e})"


@dataclass
class _Pending:
    """A file that needs its embedding from the model."""

    entry: FileEntry
    hash: str
    row_id: int


class Indexer:
    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        folder: Path,
        *,
        commit_every: int = 512,
        commit_seconds: float = 30.0,
        on_progress: ProgressCallback | None = None,
        on_failure: Callable[[Failure], None] | None = None,
        index_kind: str | None = None,
        index_memory: int | None = None,
        index_updater: Callable[..., Any] = update_after_write,
        source: Any | None = None,
    ):
        self.store = store
        self.embedder = embedder
        self.folder = Path(folder)
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self.on_progress = on_progress
        self.on_failure = on_failure
        self.index_kind = index_kind
        self.index_memory = index_memory
        # Brings the images' search index up to date after the run: update_after_write, or
        # the Ray engine's ray_update_after_write, which builds big IVF indexes in parallel.
        self.index_updater = index_updater
        # Where files are listed, hashed and read when not in the local folder: an object with
        # walk(on_error), hash(relpath) and path(relpath), e.g. remote.FsspecSource.
        self.source = source
        self.report = IndexReport()
        self._planned: dict[int, str] = {}  # row id -> "added" | "updated", for the counts

    def _count(self, row_id: int, kind: str, step: int = 1) -> None:
        self._planned[row_id] = kind
        setattr(self.report, kind, getattr(self.report, kind) + step)

    def _fail(self, path: str, error: str) -> None:
        failure = Failure(path, error)
        self.report.failed.append(failure)
        if self.on_failure:
            self.on_failure(failure)

    def run(self, writer: StoreWriter) -> IndexReport:
        start = time.perf_counter()
        dim = self.store.dim
        old = self.store.read_table(["id", "path", "size", "mtime_ns", "hash"]).to_pylist()
        by_path = {r["path"]: r for r in old}

        def on_error(rel: str, cause: str) -> None:
            self._fail(rel, cause)

        if self.source is not None:
            entries = list(self.source.walk(on_error=on_error))
        else:
            entries = list(walk_images(self.folder, exclude=[self.store.path], on_error=on_error))
        present = {e.relpath for e in entries}
        candidates = []
        for e in entries:
            row = by_path.get(e.relpath)
            if row and row["size"] == e.size and row["mtime_ns"] == e.mtime_ns:
                self.report.unchanged += 1
            else:
                candidates.append(e)

        hashes = self._hash_all(candidates)
        candidates = [e for e in candidates if e.relpath in hashes]

        # Rows free to be reused: files gone, or paths whose content changed. A path that
        # failed to hash keeps its row: a file being copied must not lose what was indexed.
        pool: dict[str, list[dict]] = {}
        for r in old:
            changed = r["path"] in hashes and hashes[r["path"]] != r["hash"]
            if (r["path"] not in present) or changed:
                pool.setdefault(r["hash"], []).append(r)
        released_ids = {r["id"] for rows in pool.values() for r in rows}
        live_by_hash = {r["hash"]: r["id"] for r in old if r["id"] not in released_ids}

        replace: list[tuple[dict, FileEntry]] = []  # (old row, new file) keeping id+embedding
        copies: list[tuple[int, FileEntry, str, int]] = []  # (source id, file, hash, row id)
        pending: list[_Pending] = []
        leftovers: list[FileEntry] = []
        for e in candidates:
            h, row = hashes[e.relpath], by_path.get(e.relpath)
            if row and row["hash"] == h:
                self.report.unchanged += 1
                replace.append((row, e))
            elif pool.get(h):
                replace.append((pool[h].pop(), e))
                self.report.renamed += 1
            else:
                leftovers.append(e)
        # The same content twice in one run is embedded once and copied.
        first_new: dict[str, _Pending] = {}
        dup_of_new: list[tuple[_Pending, FileEntry]] = []
        for e in leftovers:
            h, row = hashes[e.relpath], by_path.get(e.relpath)
            reusable = row and any(r["id"] == row["id"] for r in pool.get(row["hash"], []))
            if reusable:
                pool[row["hash"]] = [r for r in pool[row["hash"]] if r["id"] != row["id"]]
                row_id = row["id"]
                self._count(row_id, "updated")
            else:
                row_id = int(writer.allocate_ids(1)[0])
                self._count(row_id, "added")
            if h in live_by_hash:
                copies.append((live_by_hash[h], e, h, row_id))
            elif h in first_new:
                dup_of_new.append((first_new[h], e, row_id))
            else:
                first_new[h] = _Pending(e, h, row_id)
                pending.append(first_new[h])
        removed_rows = [r for rows in pool.values() for r in rows]
        self.report.removed = len(removed_rows)
        replaced_ids = {row["id"] for row, _ in replace}
        replaced_ids |= {row_id for *_, row_id in copies}
        replaced_ids |= {p.row_id for p in pending} | {rid for *_, rid in dup_of_new}

        # 1. Metadata-only changes: one commit, no model.
        meta_rows = self._reuse_rows(replace, copies, hashes, dim)
        drop = {r["id"] for r in removed_rows} | {
            i for i in replaced_ids if i in {r["id"] for r in old}
        }
        keep_for_later = {p.row_id for p in pending} | {rid for *_, rid in dup_of_new}
        # Rows that will be re-embedded keep their old version until the new one is committed.
        first_drop = drop - keep_for_later
        writer.commit(meta_rows, remove_ids=first_drop)

        # 2. Embeddings, in committed batches.
        self._embed_and_commit(writer, pending, dup_of_new, old_ids={r["id"] for r in old})

        writer.compact()
        self._sync_sidecars(writer)
        # Failing files are retried every run, so this run's failures are the whole list.
        writer.commit(failures=self.report.failed)
        self.report.index = self.index_updater(
            writer, IMAGES, kind=self.index_kind, memory=self.index_memory
        ).to_dict()
        if self.store.count(TEXTS) or writer.changed_ids(TEXTS):
            update_after_write(writer, TEXTS)
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _sync_sidecars(self, writer: StoreWriter) -> None:
        """Captions in photo.txt / photo.json beside the images become text rows."""
        if self.source is not None:
            return  # sidecar files are read from the local folder: not from a remote source yet
        images = self.store.read_table(["id", "path"])
        by_path = dict(zip(images.column("path").to_pylist(), images.column("id").to_pylist(),
                           strict=True))
        failures: list[Failure] = []
        rows = sidecar_rows(self.folder, by_path, failures)
        for failure in failures:
            self._fail(failure.path, failure.error)
        self.report.texts = sync_texts(writer, self.embedder, rows, owned=is_sidecar).to_dict()

    def _hash_all(self, entries: list[FileEntry]) -> dict[str, str]:
        def one(e: FileEntry) -> tuple[str, str | None, str | None]:
            try:
                if self.source is not None:
                    return e.relpath, self.source.hash(e.relpath), None
                return e.relpath, file_hash(self.folder / e.relpath), None
            except OSError as err:
                return e.relpath, None, _os_cause(err)

        hashes: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=4) as pool:
            for rel, h, error in pool.map(one, entries):
                if h is None:
                    self._fail(rel, error)
                else:
                    hashes[rel] = h
        return hashes

    def _reuse_rows(self, replace, copies, hashes, dim) -> pa.Table | None:
        """New versions of rows whose embedding is reused: renamed, touched, copied."""
        source_ids = [row["id"] for row, _ in replace] + [src for src, *_ in copies]
        if not source_ids:
            return None
        full = self.store.rows_by_id(source_ids)
        records = []
        for row, e in replace:
            records.append(self._record(full[row["id"]], row["id"], e, hashes[e.relpath]))
        for src, e, h, row_id in copies:
            records.append(self._record(full[src], row_id, e, h, added=True))
        table = pa.Table.from_pylist(records, schema=row_schema(dim))
        return table

    @staticmethod
    def _record(source: dict, row_id: int, e: FileEntry, h: str, added: bool = False) -> dict:
        return {
            "id": row_id,
            "path": e.relpath,
            "size": e.size,
            "mtime_ns": e.mtime_ns,
            "hash": h,
            "width": source["width"],
            "height": source["height"],
            "embedding": source["embedding"],
            "added_at": now_utc() if added else source["added_at"],
            # same bytes, same codes
            "codes": source.get("codes"),
            "codes_tokenizer": source.get("codes_tokenizer"),
        }

    def _embed_and_commit(self, writer, pending, dup_of_new, old_ids) -> None:
        total = len(pending)
        if self.on_progress:
            self.on_progress(0, total)
        if not total:
            return
        dups: dict[int, list[tuple[FileEntry, int]]] = {}
        for first, e, row_id in dup_of_new:
            dups.setdefault(first.row_id, []).append((e, row_id))
        paths = [
            self.source.path(p.entry.relpath) if self.source else str(self.folder / p.entry.relpath)
            for p in pending
        ]
        buffer: list[tuple[_Pending, np.ndarray, tuple[int, int]]] = []
        failed_ids: set[int] = set()
        last_commit = time.monotonic()
        done = 0

        def flush() -> None:
            nonlocal buffer, last_commit
            if not buffer:
                return
            records, vectors = [], []
            for p, vec, (w, h) in buffer:
                copies = [(p.entry, p.row_id)] + dups.get(p.row_id, [])
                for entry, row_id in copies:
                    records.append((row_id, entry, p.hash, w, h))
                    vectors.append(vec)
            table = pa.table(
                {
                    "id": pa.array([r[0] for r in records], pa.int64()),
                    "path": [r[1].relpath for r in records],
                    "size": pa.array([r[1].size for r in records], pa.int64()),
                    "mtime_ns": pa.array([r[1].mtime_ns for r in records], pa.int64()),
                    "hash": [r[2] for r in records],
                    "width": pa.array([r[3] for r in records], pa.int32()),
                    "height": pa.array([r[4] for r in records], pa.int32()),
                    "embedding": embeddings_to_arrow(np.stack(vectors)),
                    "added_at": pa.array([now_utc()] * len(records), pa.timestamp("us", "UTC")),
                }
            )
            writer.commit(table, remove_ids=[r[0] for r in records if r[0] in old_ids])
            buffer = []
            last_commit = time.monotonic()

        for batch in self.embedder.iter_image_files(paths):
            for i, cause in batch.failures:
                for entry, _ in [(pending[i].entry, None)] + dups.get(pending[i].row_id, []):
                    self._fail(entry.relpath, cause)
                failed_ids.add(pending[i].row_id)
            for j, i in enumerate(batch.indices):
                buffer.append((pending[i], batch.embeddings[j], batch.sizes[j]))
            done += len(batch.indices) + len(batch.failures)
            self.report.embedded += len(batch.indices)
            if self.on_progress:
                self.on_progress(done, total)
            due = time.monotonic() - last_commit > self.commit_seconds
            if len(buffer) >= self.commit_every or due:
                flush()
        flush()
        # A file that failed to decode (and its copies) was counted when planned.
        for p in pending:
            if p.row_id in failed_ids:
                for row_id in [p.row_id] + [rid for _, rid in dups.get(p.row_id, [])]:
                    self._count(row_id, self._planned[row_id], -1)


def index_folder(
    store: Store,
    embedder: Embedder,
    folder: Path | str,
    *,
    wait: float = 0,
    **kwargs: Any,
) -> IndexReport:
    """Index `folder` into `store` (incrementally) and rebuild its search index.

    `folder` may be an fsspec URL (s3://bucket/prefix, ...): its objects are listed, hashed
    and read through fsspec, and their rows keep the full URL as their path."""
    if is_url(folder):
        kwargs.setdefault("source", FsspecSource(str(folder)))
    with store.writer(wait) as writer:
        return Indexer(store, embedder, Path(str(folder)), **kwargs).run(writer)


__all__ = ["IndexReport", "Indexer", "index_folder", "file_hash", "embeddings_from_arrow"]
