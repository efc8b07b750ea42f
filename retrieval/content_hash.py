"""The content hash a row records: blake2b-128 of the whole file, streamed.

One digest for local files, objects under URLs and hashes computed on Ray workers, so a
rename or copy is recognised whichever engine or source read it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def stream_hash(f: BinaryIO, chunk: int = CHUNK) -> str:
    """The digest of everything left in `f`."""
    digest = hashlib.blake2b(digest_size=16)
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def file_hash(path: Path | str, chunk: int = CHUNK) -> str:
    """The digest of a local file."""
    with open(path, "rb") as f:
        return stream_hash(f, chunk)


def unreadable(err: OSError) -> str:
    """The one-line cause a file that can't be read is reported with."""
    return f"unreadable ({err.strerror or err})"
