"""Telling an fsspec URL (s3://bucket/key, gs://..., file://..., memory://...) from a path.

Its own module, light on purpose: the store, the image loader and the remote sources all ask,
and the store is on the path of a cold `vqret search`.
"""

from __future__ import annotations

import re

# scheme://... as RFC 3986 spells a scheme; a local name that merely contains "://" later on
# (legal on Linux) stays a local path
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: object) -> bool:
    """Whether `path` is an fsspec URL rather than a local file name."""
    return isinstance(path, str) and bool(_URL.match(path))
