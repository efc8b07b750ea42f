"""What a store folder holds: its names, its tables' schemas, rows <-> arrays, the errors.

Shared by the reader (store.py) and the writer (store_writer.py); torch-free and cheap, as
every module that touches rows imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

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
    "StoreError",
    "StoreLockedError",
    "conform",
    "embeddings_from_arrow",
    "embeddings_to_arrow",
    "has_metadata",
    "now_utc",
    "row_schema",
    "table_schema",
    "text_schema",
]

# 1: the rows without the metadata columns (and width, height as decoded: the JPEG draft
#    size). 2: the metadata columns (METADATA_COLUMNS), width and height as displayed.
# A version 1 store is read as if its rows had null metadata, and `vqret index` upgrades it:
# the columns are written into its parts, ids and embeddings as they were (Indexer).
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
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
            # From the file and its EXIF (metadata.py): the capture time as local wall-clock
            # time, its offset east of UTC when known, and whether EXIF or the mtime said so.
            pa.field("taken", pa.timestamp("us")),
            pa.field("taken_offset_min", pa.int16()),
            pa.field("taken_source", pa.string()),  # "exif" | "mtime"
            pa.field("camera_make", pa.string()),
            pa.field("camera_model", pa.string()),
            pa.field("orientation", pa.int8()),  # EXIF 1..8
            pa.field("file_type", pa.string()),  # the decoded format: jpeg, png, heif...
            pa.field("gps_lat", pa.float64()),  # decimal degrees, north positive
            pa.field("gps_lon", pa.float64()),  # decimal degrees, east positive
            pa.field("folder", pa.string()),  # the path's parent; "" for the indexed root
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("added_at", pa.timestamp("us", tz="UTC")),
            # The VQ tokenizer's code grid (row-major, uint16) and the tokenizer's id; null
            # until `vqret tokenizer encode` has run with that tokenizer.
            pa.field("codes", pa.list_(pa.uint16())),
            pa.field("codes_tokenizer", pa.string()),
            # A video's moment (video_index.py): each row of a video is one segment of
            # near-identical frames; all its rows share video_id. Null for a still image.
            pa.field("video_id", pa.int64()),
            pa.field("t", pa.float64()),  # seconds: the frame the row's embedding shows
            pa.field("segment_start", pa.float64()),
            pa.field("segment_end", pa.float64()),
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


METADATA_COLUMNS = (
    "taken", "taken_offset_min", "taken_source", "camera_make", "camera_model", "orientation",
    "file_type", "gps_lat", "gps_lon", "folder",
)


def table_schema(table: str, dim: int) -> pa.Schema:
    return row_schema(dim) if table == IMAGES else text_schema(dim)


def has_metadata(schema: pa.Schema) -> bool:
    """Whether a part's rows hold the metadata columns (schema 2), or predate them."""
    return all(name in schema.names for name in METADATA_COLUMNS)


def conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """`rows` with `schema`'s columns, in its order and types: the ones a part predates as
    nulls."""
    if rows.schema == schema:
        return rows
    for field in schema:
        if field.name not in rows.column_names:
            rows = rows.append_column(field, pa.nulls(rows.num_rows, field.type))
    return rows.select(schema.names).cast(schema)


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
    flat = [_flat_values(c, dim) for c in chunks]
    return np.concatenate(flat).reshape(-1, dim) if len(flat) > 1 else flat[0].reshape(-1, dim)


def _flat_values(chunk: pa.Array, dim: int) -> np.ndarray:
    # A fixed-size list without nulls is its child array, sliced: no pyarrow.compute, whose
    # import (~65 ms) `flatten` costs a cold search of a small store.
    if pa.types.is_fixed_size_list(chunk.type) and not chunk.null_count:
        return chunk.values.slice(chunk.offset * dim, len(chunk) * dim).to_numpy(
            zero_copy_only=False)
    return chunk.flatten().to_numpy(zero_copy_only=False)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Failure:
    """A file a run couldn't index, and why.

    `size` and `mtime_ns` are set when the file was read and its content couldn't be decoded
    (not an image, truncated, an unknown codec): the same bytes fail the same way, so the
    next run reports it again without reading it, and loads no model for it, until the file
    changes or the run is asked to retry (`retry_failed`). A failure to list or read a file
    (permissions, a file being copied) has no stat and is tried again every run."""

    path: str
    error: str
    size: int | None = None
    mtime_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "error": self.error}
        if self.size is not None:
            out.update(size=self.size, mtime_ns=self.mtime_ns)
        return out


def undecodable(failures: Iterable[Failure]) -> dict[str, Failure]:
    """The failures of content that couldn't be decoded, by path (see Failure)."""
    return {f.path: f for f in failures if f.size is not None and f.mtime_ns is not None}
