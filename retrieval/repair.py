"""Repair of damaged parts: their rows re-embedded from their files, under their old ids.

The first step of every `vqret index` (Indexer.run), before anything reads the parts. For
each part the store names as damaged (part_health.py), its recovery copy (the rows without
vectors, written beside the part) gives the ids, paths and metadata of its rows; the files
are embedded again (the texts, for the text table) and the rows committed in the part's
place, in one commit per part: a run killed halfway leaves the part damaged, and the next
run repairs it again. A row whose file is gone or unreadable is dropped (the sync that
follows reports an unreadable file as it always does).

A part without a recovery copy (written by a vqret before them) is dropped; the sync then
embeds its files like new ones, under new ids, and the search index is rebuilt rather than
updated (the ids it must forget are unknown).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .part_health import DamagedPart, read_recovery
from .store import IMAGES, TABLES, StoreWriter, embeddings_to_arrow


@dataclass
class RepairReport:
    repaired: int = 0  # rows re-embedded under their old ids
    dropped: int = 0  # rows lost: file gone or unreadable, or no recovery copy
    parts: int = 0  # damaged parts replaced


def repair_damaged(writer: StoreWriter, embedder: Any, name: Callable[[str], str]) -> RepairReport:
    """Replace every damaged part of the store `writer` holds (module docstring).

    `name(path)` is what the embedder opens for a row's stored path (its file or URL)."""
    store = writer.store
    report = RepairReport()
    for table in TABLES:
        for damaged in list(store.damaged_parts(table)):
            check = store.manifest["tables"][table].get("checks", {}).get(damaged.part)
            recovered = read_recovery(store.path, table, damaged.part, check)
            lost = _rows_of(writer, damaged, recovered)
            if recovered is None:
                writer.replace_part(damaged.part, None, lost, np.zeros(0, np.int64), table)
                writer.start_generation[table] = -1  # no in-place index update: rebuild
                report.dropped += lost
            else:
                rows = (_embed_images(recovered, embedder, name) if table == IMAGES
                        else _embed_texts(recovered, embedder))
                writer.replace_part(damaged.part, rows, lost,
                                    recovered.column("id").to_numpy(), table)
                report.repaired += rows.num_rows
                report.dropped += lost - rows.num_rows
            report.parts += 1
    return report


def _rows_of(writer: StoreWriter, damaged: DamagedPart, recovered: pa.Table | None) -> int:
    """How many rows the damaged part held: recorded, in its recovery copy, or what the
    table's count leaves after the other parts' (from their Parquet footers)."""
    if damaged.rows is not None:
        return damaged.rows
    if recovered is not None:
        return recovered.num_rows
    store, table = writer.store, damaged.table
    other_damaged = {d.part: d.rows or 0 for d in store.damaged_parts(table)}
    held = 0
    for part in store.parts(table):
        if part in other_damaged:
            held += other_damaged[part] if part != damaged.part else 0
        else:
            held += pq.ParquetFile(store.path / table / part).metadata.num_rows
    return max(0, store.count(table) - held)


def _embed_images(rows: pa.Table, embedder: Any, name: Callable[[str], str]) -> pa.Table:
    """The recovered rows whose file the embedder could read, with their new embeddings.

    A video's moment (a row with a video_id) is embedded again from its frame at `t`, the
    sample nearest the segment's mean: close to the mean it held, and its id is kept."""
    paths = [name(p) for p in rows.column("path").to_pylist()]
    video_ids = (rows.column("video_id").to_pylist() if "video_id" in rows.column_names
                 else [None] * rows.num_rows)
    image_at = [i for i, v in enumerate(video_ids) if v is None]
    at: list[int] = []
    vectors: list[np.ndarray] = []
    for batch in embedder.iter_image_files([paths[i] for i in image_at]):
        at.extend(image_at[int(i)] for i in batch.indices)
        vectors.extend(batch.embeddings)
    moments = [i for i, v in enumerate(video_ids) if v is not None]
    if moments:
        from .video import VideoError, frame_at

        times = rows.column("t").to_pylist()
        for i in moments:
            try:
                frame = frame_at(paths[i], float(times[i] or 0.0))
            except (VideoError, OSError):
                continue  # the video is gone or broken: its moment is dropped
            vectors.append(np.asarray(embedder.embed_images([frame]), np.float32)[0])
            at.append(i)
    order = np.argsort(np.asarray(at, np.int64), kind="stable")  # back in the part's order
    kept = rows.take(pa.array(np.asarray(at, np.int64)[order]))
    if not len(at):
        return kept
    return kept.append_column("embedding", embeddings_to_arrow(np.stack(vectors)[order]))


def _embed_texts(rows: pa.Table, embedder: Any) -> pa.Table:
    texts = rows.column("text").to_pylist()
    if not texts:
        return rows
    vectors = np.asarray(embedder.embed_texts(texts), np.float32)
    return rows.append_column("embedding", embeddings_to_arrow(vectors))


__all__ = ["RepairReport", "repair_damaged"]
