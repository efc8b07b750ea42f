"""Content hashes of the files a run must look at, in listing order, failures as data.

One file by name (`hash_named`: a path or an fsspec URL), many on this process's threads
(`hash_here`, the default `Hasher`), or through any `Hasher` that reads them elsewhere (the
Ray engine's tasks): `hash_in_order` puts the answers, which may come in any order, back in
the order they were asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from .content_hash import file_hash, unreadable
from .remote import is_url, url_hash

# Hashes the named files anywhere (e.g. on a Ray cluster): yields (index into names, hash,
# None) or (index, None, cause) for each, in any order.
Hasher = Callable[[Sequence[str]], Iterable[tuple[int, "str | None", "str | None"]]]

HASH_CHUNK = 1 << 12  # files hashed between two Arrow chunks of hashes
HASH_THREADS = 4  # reading and hashing release the GIL


def hash_named(name: str) -> tuple[str | None, str | None]:
    """(content hash, None) of a file path or an fsspec URL, or (None, the one-line cause
    it is reported with): what the Indexer and the Ray engine's hash tasks compute."""
    try:
        return (url_hash(name) if is_url(name) else file_hash(name)), None
    except OSError as err:
        return None, unreadable(err)


def hash_here(names: Sequence[str]) -> Iterator[tuple[int, str | None, str | None]]:
    """The default Hasher: HASH_THREADS threads of this process, answers in order."""
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        for start in range(0, len(names), HASH_CHUNK):
            answers = pool.map(hash_named, names[start : start + HASH_CHUNK])
            for i, (digest, cause) in enumerate(answers, start):
                yield i, digest, cause


def hash_in_order(
    hasher: Hasher, names: Sequence[str]
) -> tuple[pa.ChunkedArray, list[tuple[int, str]]]:
    """(hashes of `names` in their order, null where unreadable; (index, cause) of each
    failure, by index), from a hasher answering in any order: put back with an Arrow sort,
    not a Python object per file."""
    at_chunks: list[np.ndarray] = [np.zeros(0, np.int64)]
    hash_chunks: list[pa.Array] = [pa.array([], pa.large_string())]
    failed: list[tuple[int, str]] = []
    at: list[int] = []
    got: list[str | None] = []

    def flush() -> None:
        at_chunks.append(np.asarray(at, np.int64))
        hash_chunks.append(pa.array(got, pa.large_string()))
        at.clear(), got.clear()

    for i, h, cause in hasher(names):
        if h is None:
            failed.append((i, cause or "unreadable"))
        at.append(i)
        got.append(h)
        if len(at) >= HASH_CHUNK:
            flush()
    flush()
    asked = np.concatenate(at_chunks)
    order = np.argsort(asked, kind="stable")
    if not np.array_equal(asked[order], np.arange(len(names))):
        # a lost or repeated answer would silently plan files as unreadable or twice
        raise RuntimeError(f"the hasher answered {len(asked)} times for {len(names)} files")
    return pa.chunked_array(hash_chunks).take(pa.array(order, pa.int64())), sorted(failed)


__all__ = ["HASH_CHUNK", "Hasher", "hash_here", "hash_in_order", "hash_named"]
