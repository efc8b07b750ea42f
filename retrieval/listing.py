"""A run's listing as Arrow columns, and the column lookups the Indexer plans with.

The plan of a 100M-image run is made on these columns (numpy and Arrow compute), never on a
Python object per file: `listing_table` turns walked `FileEntry`s into (path, size, mtime_ns)
chunks, the lookups below answer "which row has this path / hash" for whole columns, and
`NamedPaths` names the files to read on demand instead of as a list of 100M strings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .walk import FileEntry

LISTING_CHUNK = 1 << 16  # listed files turned into Arrow columns at a time
NAMES_CHUNK = 1 << 12  # names built at a time when NamedPaths is iterated


def listing_table(entries: Iterable[FileEntry]) -> pa.Table:
    """The listing as Arrow columns (path, size, mtime_ns), built a chunk at a time so the
    driver never holds a FileEntry per file, and left in chunks (not copied into one)."""
    schema = pa.schema(
        [("path", pa.large_string()), ("size", pa.int64()), ("mtime_ns", pa.int64())]
    )
    chunks: list[pa.RecordBatch] = []
    paths: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []

    def flush() -> None:
        if paths:
            chunks.append(pa.record_batch([paths, sizes, mtimes], schema=schema))
            paths.clear(), sizes.clear(), mtimes.clear()

    for e in entries:
        paths.append(e.relpath)
        sizes.append(e.size)
        mtimes.append(e.mtime_ns)
        if len(paths) >= LISTING_CHUNK:
            flush()
    flush()
    return pa.Table.from_batches(chunks, schema=schema)


def column(table: pa.Table, name: str) -> pa.Array:
    """One array of a column; strings as large_string: 100M URLs overflow the 32-bit
    offsets of one string array."""
    values = table.column(name)
    if pa.types.is_string(values.type):
        values = values.cast(pa.large_string())
    return values.combine_chunks()


def ints(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, valid) of an int64 column: nulls never compare equal to anything."""
    filled = pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return filled, pc.is_valid(values).to_numpy(zero_copy_only=False)


def positions(values: pa.Array | pa.ChunkedArray, value_set: pa.Array) -> np.ndarray:
    """For each value, the position of its first match in value_set; -1 where none."""
    found = pc.index_in(values, value_set=value_set)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def mask(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow column as a numpy mask, null as False."""
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False)


def first_equal(values: pa.ChunkedArray) -> np.ndarray:
    """For each value, the position of the first value equal to it (its own if none before):
    a stable sort, not a hash table over every new file's hash."""
    n = len(values)
    order = pc.sort_indices(values).to_numpy(zero_copy_only=False).astype(np.int64)
    ordered = values.take(pa.array(order, pa.int64()))
    starts = np.ones(n, bool)  # where a run of equal values begins, in sorted order
    if n > 1:
        starts[1:] = ~mask(pc.equal(ordered[1:], ordered[:-1]))
    del ordered
    first = np.empty(n, np.int64)
    first[order] = order[starts][np.cumsum(starts) - 1]
    return first


class NamedPaths(Sequence[str]):
    """The files the embedder (or a hasher) reads, named on demand from the listing's path
    column: a list of 100M URLs is not built on the driver (the Ray engine slices it block
    by block)."""

    def __init__(self, relpaths: pa.ChunkedArray, at: np.ndarray, name: Callable[[str], str]):
        self.relpaths = relpaths
        self.at = at  # positions in relpaths, in the embedder's order
        self.name = name

    def __len__(self) -> int:
        return len(self.at)

    def __getitem__(self, i: int | slice) -> str | list[str]:  # type: ignore[override]
        if isinstance(i, slice):
            chosen = self.relpaths.take(pa.array(self.at[i], pa.int64()))
            return [self.name(p) for p in chosen.to_pylist()]
        return self.name(self.relpaths[int(self.at[i])].as_py())

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), NAMES_CHUNK):
            yield from self[start : start + NAMES_CHUNK]


__all__ = [
    "LISTING_CHUNK",
    "NamedPaths",
    "column",
    "first_equal",
    "ints",
    "listing_table",
    "mask",
    "positions",
]
