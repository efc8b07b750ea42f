"""Incremental indexing: bring a store's rows in line with a folder, touching only what changed.

Why past 500 lines: one run's plan, embed and commit loop, and the old-store upgrade that must
commit the same way; listing and hashing are their own modules (listing.py, hasher.py).

Per file, cheapest test first (as rclip does, but with a whole-file hash):
1. same path, same size and mtime            -> unchanged, nothing read
2. same path, same content hash              -> unchanged (only size/mtime refreshed)
3. content hash of a row whose file is gone  -> renamed: the row keeps its id and embedding
4. content hash of another live row          -> duplicate: new id, embedding copied
5. anything else                             -> decoded and embedded (added, or updated in place)
Rows of files no longer present are removed. Metadata-only changes are committed first, then
embeddings in batches, so a run killed at any point loses at most the batch in flight.

Each row carries the metadata columns of its file (capture time, camera, GPS...: metadata.py):
read beside the decode for the files embedded, kept from the row for a rename or a copy (same
bytes, same EXIF). A store made before them (schema 1) gets them first, a part per commit,
without re-embedding anything (`_upgrade`).

The plan is made on Arrow and numpy columns (listing.py); new and changed files are hashed by
a Hasher (hasher.py: this process's threads, or the Ray engine's tasks). Videos, many rows a
file (one per moment), are synced after the images by video_index.py, with the same rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .hasher import Hasher, hash_here, hash_in_order
from .index import update_after_write
from .listing import NamedPaths, column, first_equal, ints, listing_table, mask, positions
from .metadata import (
    FactsReader,
    ImageFacts,
    facts_in_order,
    facts_table,
    metadata_columns,
    read_facts,
    read_facts_here,
    stored_facts,
)
from .remote import FsspecSource, is_url
from .store import (
    IMAGES,
    METADATA_COLUMNS,
    SCHEMA_VERSION,
    TEXTS,
    Failure,
    Store,
    StoreWriter,
    embeddings_to_arrow,
    has_metadata,
    now_utc,
    row_schema,
)
from .store_layout import undecodable
from .texts import is_sidecar, sidecar_rows, sync_texts
from .video import DEFAULT_EVERY
from .video_index import image_rows, sync_videos
from .walk import FileEntry, walk_images

if TYPE_CHECKING:  # torch: only once a file needs the model (deferred_embedder.py)
    from .embedder import Embedder

ProgressCallback = Callable[[int, int], None]  # (images embedded so far, images to embed)


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    renamed: int = 0
    unchanged: int = 0
    embedded: int = 0  # images that went through the model
    upgraded: int = 0  # old rows given their metadata columns (a schema 1 store's upgrade)
    repaired: int = 0  # rows of damaged parts re-embedded under their ids (repair.py)
    failed: list[Failure] = field(default_factory=list)
    # of `failed`: files that couldn't be decoded last time and haven't changed since, not
    # read again (Failure); `retry_failed` reads them again
    failed_before: int = 0
    seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)  # the search index's plan
    texts: dict[str, Any] = field(default_factory=dict)  # sidecar captions: added, removed...
    videos: dict[str, Any] = field(default_factory=dict)  # video_index.VideoReport's counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "renamed": self.renamed,
            "unchanged": self.unchanged,
            "embedded": self.embedded,
            "upgraded": self.upgraded,
            "repaired": self.repaired,
            "failed": [f.to_dict() for f in self.failed],
            "failed_before": self.failed_before,
            "texts": {k: v for k, v in self.texts.items() if k != "failed"},
            "videos": self.videos,
            "seconds": round(self.seconds, 3),
            "index": {k: self.index.get(k) for k in ("kind", "factory", "params", "recall_at_10")},
        }


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
        hasher: Hasher | None = None,
        facts_reader: FactsReader | None = None,
        walk: Callable[..., Iterable[FileEntry]] = walk_images,
        video_every: float = DEFAULT_EVERY,
        on_video_frames: Callable[[int], None] | None = None,
        retry_failed: bool = False,
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
        # Where files are listed and read when not in the local folder: an object with
        # walk(on_error) and path(relpath), e.g. remote.FsspecSource; what path() names is
        # hashed by hash_named, as the Ray engine's hash tasks do.
        self.source = source
        # Where new and changed files are hashed: None for 4 threads on this process, or a
        # Hasher that reads them elsewhere (the Ray engine's: the driver reads no image).
        self.hasher = hasher
        # Where an old store's rows have their files' headers read when it is upgraded: None
        # for a few threads on this process, or the Ray engine's tasks.
        self.facts_reader = facts_reader
        # How the local folder is listed: walk_images, or a wrapper over it (watch.py holds
        # back files still being written).
        self.walk = walk
        # Videos (video_index.py): a sample at least every `video_every` seconds;
        # on_video_frames(n) after each batch of n frames embedded.
        self.video_every = video_every
        self.on_video_frames = on_video_frames
        # Files whose content failed to decode at this size and mtime, by path (Failure):
        # skipped unless `retry_failed`.
        self.undecodable = {} if retry_failed else undecodable(store.failures)
        self.report = IndexReport()

    def _fail(self, path: str, error: str, size: int | None = None,
              mtime_ns: int | None = None) -> None:
        """`size` and `mtime_ns`: the file was read and its content couldn't be decoded."""
        failure = Failure(path, error, size, mtime_ns)
        self.report.failed.append(failure)
        if self.on_failure:
            self.on_failure(failure)

    def _failed_before(self, path: str, size: int | None, mtime_ns: int | None) -> bool:
        """Whether `path` failed to decode before at this size and mtime; if so it is
        reported again (in the list, not through on_failure: a cron job would repeat it)."""
        failure = self.undecodable.get(path)
        if failure is None or (failure.size, failure.mtime_ns) != (size, mtime_ns):
            return False
        self.report.failed.append(failure)
        self.report.failed_before += 1
        return True

    def run(self, writer: StoreWriter) -> IndexReport:
        """Bring the rows in line with the folder, then the search index with the rows."""
        start = time.perf_counter()
        self._repair(writer)
        self._upgrade(writer)
        # The plan's columns live in _sync_rows' frame: let go before the index is built,
        # which at 100M rows needs the memory as much as the plan did.
        self._sync_rows(writer)
        self._sync_videos(writer)
        writer.compact()
        self._sync_sidecars(writer)
        # This run's failures are the whole list: those read again and those unchanged
        # since they failed to decode (reported from the last record, _failed_before).
        writer.commit(failures=self.report.failed)
        self.report.index = self.index_updater(
            writer, IMAGES, kind=self.index_kind, memory=self.index_memory
        ).to_dict()
        if self.store.count(TEXTS) or len(writer.changed_ids(TEXTS)):
            update_after_write(writer, TEXTS)
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _repair(self, writer: StoreWriter) -> None:
        """Damaged parts first (repair.py): every later step reads the parts."""
        from .repair import repair_damaged

        repair = repair_damaged(writer, self.embedder, self._namer())
        self.report.repaired += repair.repaired
        self.report.removed += repair.dropped

    def _upgrade(self, writer: StoreWriter) -> None:
        """Schema 1 -> 2: the metadata columns written into the rows without them, a part per
        commit, from each row's file (its header, read by `self.facts_reader`) or, for a file
        gone or unreadable, from what the row knows (path, mtime, size as stored). Ids,
        embeddings and the search index stay as they were; a run killed halfway resumes at
        the parts not done. Width and height become the displayed size too (schema 1 had
        the JPEG draft's). A file changed since its row was made is re-embedded right after,
        by the sync, with its new header."""
        reader = self.facts_reader or read_facts_here
        name = self._namer()
        for part in _parts_lacking_metadata(self.store):
            rows = self.store.read_part(part, ["path", "mtime_ns", "width", "height",
                                               *METADATA_COLUMNS])
            todo = pc.is_null(rows["taken_source"]).combine_chunks()  # rows written without
            at = pa.array(np.flatnonzero(mask(todo)), pa.int64())
            paths, mtimes = rows["path"].take(at), rows["mtime_ns"].take(at)
            facts = facts_table(facts_in_order(reader, [name(p) for p in paths.to_pylist()]))
            for side in ("width", "height"):  # a file that can't be read: its size as stored
                known = pc.coalesce(facts[side], rows[side].take(at))
                facts = facts.set_column(facts.schema.get_field_index(side), side, known)
            new = metadata_columns(facts, paths, mtimes, self.store.root_url)
            writer.set_part_columns(part, {
                c: pc.replace_with_mask(rows[c].combine_chunks(), todo, new[c].cast(rows[c].type))
                for c in new
            })
            self.report.upgraded += len(at)
        if self.store.schema_version < SCHEMA_VERSION:
            writer.commit(schema_version=SCHEMA_VERSION)

    def _sync_rows(self, writer: StoreWriter) -> None:
        """Plan the run on Arrow and numpy columns, not a Python object per row: the driver
        of a 100M-image collection peaks at a few hundred bytes per row, not kilobytes
        (benchmarks/README.md, "what the driver holds per row"); then commit metadata-only
        changes and embed the rest."""
        # The writer holds the lock: the rows can't change between this read and the hashes'.
        # a video's rows are video_index.py's: not files of this plan
        old = image_rows(self.store.read_table(["id", "path", "size", "mtime_ns", "video_id"]))
        old_ids = old.column("id").to_numpy().astype(np.int64, copy=False)
        old_stat = [ints(column(old, name)) for name in ("size", "mtime_ns")]
        old_paths = column(old, "path")
        del old

        def on_error(rel: str, cause: str) -> None:
            self._fail(rel, cause)

        if self.source is not None:
            entries = self.source.walk(on_error=on_error)
        else:
            entries = self.walk(self.folder, exclude=[self.store.path], on_error=on_error)
        listing = listing_table(entries)
        paths = listing.column("path")
        at = positions(paths, old_paths)  # each listed file's row (same path), -1: none
        has_row = at >= 0
        same_stat = np.zeros(len(at), bool)
        rows = at[has_row]
        same = np.ones(len(rows), bool)
        for name, (values, valid) in zip(("size", "mtime_ns"), old_stat, strict=True):
            new, _ = ints(listing.column(name).combine_chunks())
            same &= (values[rows] == new[has_row]) & valid[rows]
        same_stat[has_row] = same
        del old_paths, old_stat, same
        old_hash = column(image_rows(self.store.read_table(["hash", "video_id"])), "hash")
        self.report.unchanged += int(same_stat.sum())
        cand = np.flatnonzero(~same_stat)  # listing positions, in listing order
        cand = self._without_undecodable(cand, listing)

        # A first run (no rows yet) has nothing to recognise a rename or a copy by: when the
        # embedder hashes what it reads (the Ray engine's actors), each file is read once,
        # not once to hash and again to embed. (Only the same content twice in this run is
        # then embedded twice instead of copied.)
        if not len(old_ids) and getattr(self.embedder, "hashes_what_it_reads", False):
            hashes = pa.chunked_array([pa.nulls(len(cand), pa.large_string())])
        else:
            hashes = self._hash_all(cand, paths)
            hashed = mask(pc.is_valid(hashes))
            cand, hashes = cand[hashed], hashes.filter(pa.array(hashed))
        cand_at = at[cand]

        # Rows free to be reused: files gone, or paths whose content changed. A path that
        # failed to hash keeps its row: a file being copied must not lose what was indexed.
        touched = np.zeros(len(cand), bool)
        with_row = cand_at >= 0
        if with_row.any():
            touched[with_row] = mask(
                pc.equal(hashes.filter(pa.array(with_row)), old_hash.take(cand_at[with_row]))
            )
        released = np.ones(len(old_ids), bool)  # rows of files gone...
        released[at[has_row]] = False
        released[cand_at[with_row & ~touched]] = True
        live = ~released  # rows whose content a new file copies instead of embedding
        self.report.unchanged += int(touched.sum())

        # Renames: a changed file takes a released row of its content, the pool of each hash
        # handed out last row first. Only files whose content some released row had need the
        # pool, so it is built for those alone.
        source_pos = np.where(touched, cand_at, -1)  # the row whose embedding a file keeps
        taken = np.zeros(len(old_ids), bool)
        rest = np.flatnonzero(~touched)
        maybe = np.zeros(0, np.int64)
        if released.any() and len(rest):
            released_hash = old_hash.filter(pa.array(released))
            maybe = np.flatnonzero(~touched & mask(pc.is_in(hashes, value_set=released_hash)))
        if len(maybe):
            maybe_hashes = hashes.take(pa.array(maybe, pa.int64())).combine_chunks()
            in_pool = released & mask(pc.is_in(old_hash, value_set=maybe_hashes))
            pool: dict[str, list[int]] = {}
            for pos in np.flatnonzero(in_pool).tolist():
                pool.setdefault(old_hash[pos].as_py(), []).append(pos)
            for c, h in zip(maybe.tolist(), maybe_hashes.to_pylist(), strict=True):
                if pool.get(h):
                    source_pos[c] = pos = pool[h].pop()
                    taken[pos] = True
                    self.report.renamed += 1
        left = rest[source_pos[rest] < 0]  # to embed or copy, in listing order

        # A changed file keeps its own row's id unless a rename took that row.
        own = cand_at[left]
        reuse = own >= 0
        reuse[reuse] = ~taken[own[reuse]]
        row_ids = np.empty(len(left), np.int64)
        row_ids[reuse] = old_ids[own[reuse]]
        if (~reuse).any():
            row_ids[~reuse] = writer.allocate_ids(int((~reuse).sum()))
        self.report.updated += int(reuse.sum())
        self.report.added += int((~reuse).sum())
        released[own[reuse]] = False
        removed = released & ~taken
        self.report.removed += int(removed.sum())

        # Content of a live row is copied (the last such row, as a dict keyed by hash
        # would); the same new content twice in one run is embedded once and copied.
        left_hashes = hashes.take(pa.array(left, pa.int64())).combine_chunks()
        copy_of = np.full(len(left), -1, np.int64)  # the source row's position in old
        if len(left) and live.any():
            # hash tables over the few rows that match, not over every live row
            same = np.flatnonzero(live & mask(pc.is_in(old_hash, value_set=left_hashes)))
            same = same[::-1]  # last row first: index_in answers the first match
            found = positions(left_hashes, old_hash.take(pa.array(same, pa.int64())))
            copy_of[found >= 0] = same[found[found >= 0]]
        is_copy = copy_of >= 0
        new = np.flatnonzero(~is_copy)
        first = first_equal(left_hashes.take(pa.array(new, pa.int64())))
        is_first = first == np.arange(len(new))
        pending = new[is_first]  # indices into left, embedded
        pending_of = np.full(len(new), -1, np.int64)
        pending_of[is_first] = np.arange(len(pending))
        dups: dict[int, list[int]] = {}  # pending index -> indices into left copying it
        for k in np.flatnonzero(~is_first).tolist():
            dups.setdefault(int(pending_of[first[k]]), []).append(int(new[k]))
        del left_hashes

        # 1. Metadata-only changes: one commit, no model.
        replaced = np.flatnonzero(source_pos >= 0)
        copies = np.flatnonzero(is_copy)
        meta_rows = self._reuse_rows(
            listing, hashes, cand,
            sources=np.concatenate([old_ids[source_pos[replaced]], old_ids[copy_of[copies]]]),
            new_ids=np.concatenate([old_ids[source_pos[replaced]], row_ids[copies]]),
            files=np.concatenate([replaced, left[copies]]),
            n_added=len(copies),
        )
        # Rows that will be re-embedded keep their old version until the new one is committed.
        first_drop = np.concatenate(
            [old_ids[removed], old_ids[source_pos[replaced]], row_ids[copies][reuse[copies]]]
        )
        writer.commit(meta_rows, remove_ids=first_drop)

        # 2. Embeddings, in committed batches.
        to_embed = _ToEmbed(listing, hashes, cand[left], left, row_ids, reuse, pending, dups)
        self._embed_and_commit(writer, to_embed)

    def _without_undecodable(self, cand: np.ndarray, listing: pa.Table) -> np.ndarray:
        """`cand` less the files that failed to decode before and haven't changed."""
        if not self.undecodable or not len(cand):
            return cand
        paths = listing.column("path").take(pa.array(cand, pa.int64()))
        known = pa.array(list(self.undecodable), paths.type)
        keep = np.ones(len(cand), bool)
        for i in np.flatnonzero(mask(pc.is_in(paths, value_set=known))).tolist():
            at = int(cand[i])
            keep[i] = not self._failed_before(paths[i].as_py(), listing["size"][at].as_py(),
                                              listing["mtime_ns"][at].as_py())
        return cand[keep]

    def _sync_videos(self, writer: StoreWriter) -> None:
        """The videos' segments as rows (video_index.py): a commit per video changed."""
        if self.source is not None:
            return  # videos are read from the local folder: not from a remote source yet
        videos = sync_videos(self.store, self.embedder, self.folder, writer,
                             every=self.video_every, on_failure=self._fail,
                             failed_before=self._failed_before,
                             on_frames=self.on_video_frames)
        self.report.videos = videos.to_dict()

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

    def _hash_all(self, files: np.ndarray, paths: pa.ChunkedArray) -> pa.ChunkedArray:
        """Content hashes of the listed files at `files`, null where the file can't be read,
        through `self.hasher` (or this process's threads), in listing order."""
        if not len(files):  # no job for nothing: a Ray hasher would start one on the cluster
            return pa.chunked_array([pa.array([], pa.large_string())])
        names = NamedPaths(paths, files, self._namer())
        hashes, failed = hash_in_order(self.hasher or hash_here, names)
        for i, cause in failed:
            self._fail(paths[int(files[i])].as_py(), cause)
        return hashes

    def _namer(self) -> Callable[[str], str]:
        """What the embedder (or a hasher) opens for a listed path: its URL or file path."""
        if self.source is not None:
            return self.source.path
        folder = self.folder
        return lambda rel: str(folder / rel)

    def _reuse_rows(
        self, listing: pa.Table, hashes: pa.Array, cand: np.ndarray, *, sources: np.ndarray,
        new_ids: np.ndarray, files: np.ndarray, n_added: int,
    ) -> pa.Table | None:
        """New versions of rows whose embedding is reused: renamed, touched (the row itself)
        and, the last `n_added`, copied. `files` index `hashes` and `cand` (the listing
        positions of the files hashed)."""
        if not len(sources):
            return None
        full = self.store.read_table()
        position = pc.index_in(pa.array(sources, pa.int64()), value_set=full["id"].combine_chunks())
        rows = full.take(position)
        at = pa.array(files, pa.int64())
        listed = listing.take(pa.array(cand[files], pa.int64()))
        kept = len(sources) - n_added
        added_at = rows["added_at"].slice(0, kept).combine_chunks().cast(pa.timestamp("us", "UTC"))
        now = pa.array([now_utc()] * n_added, pa.timestamp("us", "UTC"))
        schema = row_schema(self.store.dim)
        columns = {
            "id": pa.array(new_ids, pa.int64()),
            "path": listed["path"],
            "size": listed["size"],
            "mtime_ns": listed["mtime_ns"],
            "hash": hashes.take(at),
            "added_at": pa.concat_arrays([added_at, now]),
            # same bytes, same header: the stored facts, with the new path's folder and mtime
            **metadata_columns(stored_facts(rows), listed["path"], listed["mtime_ns"],
                               self.store.root_url),
        }
        for name in schema.names:  # the rest as stored: same bytes, same size, codes...
            if name not in columns:
                stored = name in rows.column_names
                columns[name] = rows[name] if stored else pa.nulls(len(rows), schema[name].type)
        return pa.table({name: columns[name] for name in schema.names}).cast(schema)

    def _embed_and_commit(self, writer: StoreWriter, todo: _ToEmbed) -> None:
        total = len(todo.pending)
        if self.on_progress:
            self.on_progress(0, total)
        if not total:
            return
        paths = NamedPaths(todo.listing["path"], todo.file_at[todo.pending], self._namer())
        # (pending index, embedding, header facts, content hash if the embedder gave one)
        buffer: list[tuple[int, np.ndarray, ImageFacts, str | None]] = []
        failed: list[int] = []
        last_commit = time.monotonic()
        done = 0

        def flush() -> None:
            nonlocal buffer, last_commit
            if not buffer:
                return
            rows, vectors, facts, read_hashes = [], [], [], []
            for i, vec, header, content in buffer:
                for j in todo.with_copies(i):  # a copy: the same bytes, the same header
                    rows.append(j)
                    vectors.append(vec)
                    facts.append(header)
                    read_hashes.append(content)
            at = np.asarray(rows, np.int64)
            files = todo.listing.take(pa.array(todo.file_at[at], pa.int64()))
            ids = todo.row_ids[at]
            planned = todo.hashes.take(pa.array(todo.hash_at[at], pa.int64()))
            table = pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "path": files["path"],
                    "size": files["size"],
                    "mtime_ns": files["mtime_ns"],
                    # the hash the plan used, or the one the embedder took while reading
                    "hash": pc.coalesce(planned, pa.array(read_hashes, pa.large_string())),
                    **metadata_columns(facts_table(facts), files["path"], files["mtime_ns"],
                                       self.store.root_url),
                    "embedding": embeddings_to_arrow(np.stack(vectors)),
                    "added_at": pa.array([now_utc()] * len(at), pa.timestamp("us", "UTC")),
                }
            )
            # a changed file's new version replaces its old row (same id)
            writer.commit(table, remove_ids=ids[todo.reuse[at]])
            buffer = []
            last_commit = time.monotonic()

        for batch in self.embedder.iter_image_files(paths):
            for i, cause in batch.failures:
                for j in todo.with_copies(i):
                    file = todo.listing.slice(int(todo.file_at[j]), 1).to_pylist()[0]
                    self._fail(file["path"], cause, file["size"], file["mtime_ns"])
                failed.append(i)
            for j, i in enumerate(batch.indices):
                content = batch.hashes[j] if batch.hashes is not None else None
                buffer.append((i, batch.embeddings[j], _facts(batch, j, paths, i), content))
            done += len(batch.indices) + len(batch.failures)
            self.report.embedded += len(batch.indices)
            if self.on_progress:
                self.on_progress(done, total)
            due = time.monotonic() - last_commit > self.commit_seconds
            if len(buffer) >= self.commit_every or due:
                flush()
        flush()
        # A file that failed to decode (and its copies) was counted when planned.
        for i in sorted(failed):
            for j in todo.with_copies(i):
                if todo.reuse[j]:
                    self.report.updated -= 1
                else:
                    self.report.added -= 1


def _facts(batch: Any, j: int, paths: NamedPaths, i: int) -> ImageFacts:
    """The header facts of a batch's j-th file (paths[i]): as the embedder read them beside
    the decode, or read here from an embedder that doesn't; the decoded size where the header
    has none."""
    given = getattr(batch, "facts", None)
    facts = given[j] if given is not None else read_facts(paths[i])
    if facts.width is None:
        facts = replace(facts, width=batch.sizes[j][0], height=batch.sizes[j][1])
    return facts


def _parts_lacking_metadata(store: Store) -> list[str]:
    """The image parts with rows that have no metadata (a schema 1 store's, or rows committed
    without): told by each part's Parquet statistics, without reading its rows."""
    lacking = []
    for part in store.parts(IMAGES):
        path = store.path / IMAGES / part
        meta = pq.ParquetFile(path).metadata
        if not has_metadata(meta.schema.to_arrow_schema()):
            lacking.append(part)
            continue
        leaf = [meta.schema.column(k).path for k in range(meta.num_columns)].index("taken_source")
        stats = [meta.row_group(g).column(leaf).statistics for g in range(meta.num_row_groups)]
        if any(s is None or not s.has_null_count for s in stats):
            nulls = store.read_part(part, ["taken_source"])["taken_source"].null_count
        else:
            nulls = sum(s.null_count for s in stats)
        if nulls:
            lacking.append(part)
    return lacking


@dataclass
class _ToEmbed:
    """The files a run sends through the model or copies from one that is, as columns."""

    listing: pa.Table  # path, size, mtime_ns of each listed file
    hashes: pa.Array  # content hashes of the files hashed
    file_at: np.ndarray  # each changed or new file's position in listing...
    hash_at: np.ndarray  # ... and in hashes
    row_ids: np.ndarray  # the row each becomes
    reuse: np.ndarray  # True: its own row's id, updated in place; False: added
    pending: np.ndarray  # the files embedded (indices into file_at), one per new content
    dups: dict[int, list[int]]  # pending index -> files with the same content, copied

    def with_copies(self, i: int) -> list[int]:
        """The files that pending file i's embedding becomes: itself and its duplicates."""
        return [int(self.pending[i])] + self.dups.get(i, [])


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


__all__ = ["IndexReport", "Indexer", "index_folder"]
