"""Videos in the image table: each video's segments are rows, kept in step with the folder.

A video is many rows (one per segment of near-identical frames, video.py), all with the same
`video_id`, `path` and content `hash`. Per listed video, cheapest test first, as for images:
1. same path, same size and mtime         -> unchanged, nothing read
2. same path, same content hash           -> unchanged (size/mtime refreshed in its rows)
3. content hash of a video whose file is gone -> renamed: its rows keep ids and embeddings
4. content hash of another live video     -> a copy: its rows copied under new ids
5. anything else                          -> sampled and embedded; the rows of the old
                                             version (same path) replaced in the same commit
Each video is its own commit, so a run killed at any point resumes after the last video
committed, and a reader never sees half a video. A video that fails (broken, truncated, an
unknown codec) is reported with its cause and keeps the rows it had. Rows of videos no
longer listed are removed at the end.

Images never see these rows: the image sync plans on `image_rows` (rows without a
video_id), so a video's many rows don't look like one file to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .hasher import hash_named
from .metadata import ImageFacts, facts_table, metadata_columns, stored_facts
from .store_layout import Failure, embeddings_to_arrow, now_utc, row_schema
from .video import DEFAULT_EVERY, VIDEO_EXTENSIONS, VideoError, embed_video
from .walk import walk_images

__all__ = ["VideoReport", "image_rows", "sync_videos"]

VIDEO_COLUMNS = ("video_id", "t", "segment_start", "segment_end")


@dataclass
class VideoReport:
    added: int = 0  # videos
    updated: int = 0
    renamed: int = 0
    removed: int = 0
    unchanged: int = 0
    embedded_frames: int = 0  # sampled frames through the model
    segments: int = 0  # rows written for the videos embedded
    video_seconds: float = 0.0  # of the videos embedded
    failed: list[Failure] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("added", "updated", "renamed", "removed",
                                              "unchanged", "embedded_frames", "segments")}
        out["video_seconds"] = round(self.video_seconds, 3)
        out["failed"] = len(self.failed)
        return out


def image_rows(table: pa.Table) -> pa.Table:
    """The rows of still images: a table read with a video_id column, without those of
    videos (and without that column)."""
    keep = pc.is_null(table["video_id"])
    return table.filter(keep).drop_columns(["video_id"])


@dataclass
class _Video:
    """A video's rows as stored."""

    video_id: int
    path: str
    size: int | None
    mtime_ns: int | None
    hash: str | None
    ids: list[int]


def _stored_videos(store: Any) -> dict[int, _Video]:
    rows = store.read_table(["id", "path", "size", "mtime_ns", "hash", "video_id"])
    rows = rows.filter(pc.is_valid(rows["video_id"]))
    videos: dict[int, _Video] = {}
    for r in rows.to_pylist():
        v = videos.get(r["video_id"])
        if v is None:
            videos[r["video_id"]] = v = _Video(r["video_id"], r["path"], r["size"],
                                               r["mtime_ns"], r["hash"], [])
        v.ids.append(r["id"])
    return videos


def sync_videos(
    store: Any, embedder: Any, folder: Path, writer: Any, *,
    every: float = DEFAULT_EVERY,
    on_failure: Callable[[str, str], None] | None = None,
    on_frames: Callable[[int], None] | None = None,
    failed_before: Callable[[str, int, int], bool] | None = None,
) -> VideoReport:
    """Bring the video rows of `store` in line with the videos under `folder` (module
    docstring); one commit per video changed. `failed_before(path, size, mtime_ns)` says
    whether a video failed to decode before as it is now: then it isn't read again.
    `on_failure(path, cause, size, mtime_ns)`: the stat only for a video that was read and
    couldn't be decoded (store_layout.Failure)."""
    report = VideoReport()

    def fail(path: str, cause: str, entry: Any = None) -> None:
        stat = (entry.size, entry.mtime_ns) if entry is not None else (None, None)
        report.failed.append(Failure(path, cause, *stat))
        if on_failure:
            on_failure(path, cause, *stat)

    # the image walk already reported unreadable folders: not twice
    listed = list(walk_images(folder, exclude=[store.path], extensions=VIDEO_EXTENSIONS))
    stored = _stored_videos(store)
    if not listed and not stored:
        return report
    by_path = {v.path: v for v in stored.values()}
    to_embed: list[tuple[Any, str, _Video | None]] = []  # (listed file, hash, own rows)
    listed_paths = {e.relpath for e in listed}
    gone = {vid: v for vid, v in stored.items() if v.path not in listed_paths}
    stored_rows = _VideoRows(store)

    for entry in listed:
        own = by_path.get(entry.relpath)
        if own is not None and own.size == entry.size and own.mtime_ns == entry.mtime_ns:
            report.unchanged += 1
            continue
        if failed_before is not None and failed_before(entry.relpath, entry.size,
                                                        entry.mtime_ns):
            continue
        name = str(folder / entry.relpath)
        digest, cause = hash_named(name)
        if digest is None:
            fail(entry.relpath, cause or "unreadable")
            continue
        if own is not None and own.hash == digest:
            # touched: the same rows, under the new size and mtime
            _move(store, writer, stored_rows, own, entry, own.video_id, own.ids)
            report.unchanged += 1
            continue
        source = next((v for v in gone.values() if v.hash == digest), None)
        if source is not None and own is None:
            _move(store, writer, stored_rows, source, entry, source.video_id, source.ids)
            del gone[source.video_id]
            report.renamed += 1
            continue
        copy = next((v for v in stored.values() if v.hash == digest
                     and v.video_id not in gone), None)
        if copy is not None and own is None:
            new_id = int(writer.allocate_ids(1)[0])
            ids = writer.allocate_ids(len(copy.ids)).tolist()
            _move(store, writer, stored_rows, copy, entry, new_id, ids, replace=False)
            report.added += 1
            continue
        to_embed.append((entry, digest, own))

    # The engine's own way when it has one (the Ray engine: a video per actor task), else
    # this process's model; either way each video is committed as soon as it is embedded.
    # Nothing to embed asks nothing of the embedder: a stand-in would load the model.
    names = [str(folder / entry.relpath) for entry, _, _ in to_embed]
    embedded = _embed_many(embedder, names, every, on_frames) if names else iter(())
    for i, video in embedded:
        entry, digest, own = to_embed[i]
        if isinstance(video, VideoError):
            fail(entry.relpath, video.cause, entry)
            continue
        video_id = own.video_id if own is not None else int(writer.allocate_ids(1)[0])
        rows = _rows(store, writer, entry, digest, video_id, video)
        # the old version's rows go in the same commit as the new ones: never half a video
        writer.commit(rows, remove_ids=own.ids if own is not None else ())
        if own is not None:
            report.updated += 1
        else:
            report.added += 1
        report.embedded_frames += video.samples
        report.segments += len(video.segments)
        report.video_seconds += video.info.duration

    removed = list(gone.values())  # not listed, and no file took their rows
    if removed:
        writer.commit(remove_ids=[i for v in removed for i in v.ids])
        report.removed = len(removed)
    return report


def _embed_many(embedder: Any, names: list[str], every: float,
                on_frames: Callable[[int], None] | None) -> Iterator[tuple[int, Any]]:
    embed_videos = getattr(embedder, "embed_videos", None)
    if embed_videos is not None:
        return embed_videos(names, every, on_frames)
    return _embed_here(_local_model(embedder), names, every, on_frames)


def _embed_here(model: Any, names: list[str], every: float,
                on_frames: Callable[[int], None] | None) -> Iterator[tuple[int, Any]]:
    """(index into names, EmbeddedVideo or VideoError), one video after another."""
    for i, name in enumerate(names):
        try:
            yield i, embed_video(model, name, every, on_frames=on_frames)
        except VideoError as e:
            yield i, e


def _local_model(embedder: Any) -> Any:
    """The model that embeds a video's frames in this process: the embedder itself, or the
    local model of an engine that only takes image files (its `text_embedder`, which sidecar
    captions use too)."""
    if getattr(embedder, "encode_pixels", None):
        return embedder
    return embedder.text_embedder


def _rows(store: Any, writer: Any, entry: Any, digest: str, video_id: int,
          video: Any) -> pa.Table:
    segments = video.segments
    n = len(segments)
    ids = writer.allocate_ids(n)
    facts = ImageFacts(width=video.info.width or None, height=video.info.height or None)
    paths = pa.array([entry.relpath] * n, pa.string())
    mtimes = pa.array([entry.mtime_ns] * n, pa.int64())
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "path": paths,
        "size": pa.array([entry.size] * n, pa.int64()),
        "mtime_ns": mtimes,
        "hash": pa.array([digest] * n, pa.string()),
        # the file type from the extension: mp4, mov, mkv...
        **metadata_columns(facts_table([facts] * n), paths, mtimes, store.root_url),
        "embedding": embeddings_to_arrow(np.stack([s.embedding for s in segments])),
        "added_at": pa.array([now_utc()] * n, pa.timestamp("us", "UTC")),
        "video_id": pa.array([video_id] * n, pa.int64()),
        "t": pa.array([s.t for s in segments], pa.float64()),
        "segment_start": pa.array([s.start for s in segments], pa.float64()),
        "segment_end": pa.array([s.end for s in segments], pa.float64()),
    })


class _VideoRows:
    """The video rows as the run found them, read once when a first video is renamed or
    copied (not the whole table per video). A rename, touch or copy reads the rows of a
    video the run hasn't committed anything for, so the snapshot stays right for them."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._rows: pa.Table | None = None

    def of(self, ids: list[int]) -> pa.Table:
        if self._rows is None:
            rows = self.store.read_table()
            self._rows = rows.filter(pc.is_valid(rows["video_id"]))
        position = pc.index_in(pa.array(ids, pa.int64()), value_set=self._rows["id"])
        return self._rows.take(position)


def _move(store: Any, writer: Any, stored_rows: _VideoRows, source: _Video, entry: Any,
          video_id: int, ids: list[int], *, replace: bool = True) -> None:
    """`source`'s rows under the listed file `entry`: its path, size and mtime, with
    `video_id` and `ids`; the old rows dropped in the same commit when `replace` (a rename
    or a touch), kept when not (a copy)."""
    rows = stored_rows.of(source.ids)
    n = rows.num_rows
    paths = pa.array([entry.relpath] * n, pa.string())
    mtimes = pa.array([entry.mtime_ns] * n, pa.int64())
    columns = {
        "id": pa.array(ids, pa.int64()),
        "path": paths,
        "size": pa.array([entry.size] * n, pa.int64()),
        "mtime_ns": mtimes,
        "video_id": pa.array([video_id] * n, pa.int64()),
        **metadata_columns(stored_facts(rows), paths, mtimes, store.root_url),
    }
    if not replace:
        columns["added_at"] = pa.array([now_utc()] * n, pa.timestamp("us", "UTC"))
    schema = row_schema(store.dim)
    table = pa.table({name: columns[name] if name in columns else rows[name]
                      for name in schema.names}).cast(schema)
    writer.commit(table, remove_ids=source.ids if replace else ())
