"""Telling an fsspec URL (s3://bucket/key, gs://..., file://..., memory://...) from a path.

Its own module, light on purpose: the store, the image loader and the remote sources all ask,
and the store is on the path of a cold `vqret search`.
"""

from __future__ import annotations

import os
import re

# scheme://... as RFC 3986 spells a scheme; a local name that merely contains "://" later on
# (legal on Linux) stays a local path
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*"
_URL = re.compile(rf"^{_SCHEME}://")
# what a pathlib.Path (typer's Path options) makes of a URL: "s3://b/p" -> "s3:/b/p"
_FOLDED_URL = re.compile(rf"^{_SCHEME}:/")


def is_url(path: object) -> bool:
    """Whether `path` is an fsspec URL rather than a local file name."""
    return isinstance(path, str) and bool(_URL.match(path))


def was_url(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a URL that went through pathlib.Path, which folds "//" into "/"."""
    return bool(_FOLDED_URL.match(os.fspath(path)))
