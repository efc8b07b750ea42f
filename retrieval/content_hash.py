"""File digests: the content hash a row records, and the sha256 that names weights.

A row's hash is blake2b-128 of the whole file, streamed: one digest for local files, objects
under URLs and hashes computed on Ray workers, so a rename or copy is recognised whichever
engine or source read it. Weights files (a CLIP checkpoint's `weights_id`, the tokenizer's
id) are named by their sha256, the digest model hubs publish.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["CHUNK", "file_hash", "file_sha256", "stream_hash", "unreadable"]

CHUNK = 1 << 20


def stream_hash(f: BinaryIO, chunk: int = CHUNK, digest: Any = None) -> str:
    """The digest (a row's blake2b-128 unless another hashlib object is given) of everything
    left in `f`."""
    digest = digest if digest is not None else hashlib.blake2b(digest_size=16)
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def file_hash(path: Path | str, chunk: int = CHUNK) -> str:
    """The digest of a local file."""
    with open(path, "rb") as f:
        return stream_hash(f, chunk)


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a local file: the id of a weights file."""
    with open(path, "rb") as f:
        return stream_hash(f, chunk, hashlib.sha256())


def unreadable(err: OSError) -> str:
    """The one-line cause a file that can't be read is reported with (hashing it, decoding
    it, encoding its codes): "unreadable (No such file or directory)"."""
    return f"unreadable ({err.strerror or err})"

