"""Checking what a request sends: numbers, base64 images, vectors, and URLs to fetch.

Every failure is a RequestError, which the server turns into a 4xx and a one-line JSON error.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any
from urllib.parse import urlparse

import numpy as np


class RequestError(Exception):
    """A bad request: becomes an HTTP status and a one-line JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def normalise(vector: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise RequestError(400, f"{what} must be a finite, non-zero vector")
    return (vector / norm).astype(np.float32)


def decode_base64(value: Any, what: str) -> bytes:
    """Base64 image bytes; a `data:image/...;base64,` prefix (as browsers make) is allowed."""
    if not isinstance(value, str):
        raise RequestError(400, f"{what} must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{what} is not valid base64") from None


def parse_int(value: Any, what: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """An int from JSON or a form field, in range; anything else is a 400."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(400, f"{what} must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        top = f"..{maximum}" if maximum is not None else " or more"
        raise RequestError(400, f"{what} must be in {minimum}{top}, not {value}")
    return value


def fetch_url(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """GET an http(s) URL: at most `max_bytes`, about `timeout_s` in all, 3 redirects."""
    import httpx

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RequestError(400, "image_url must be an http:// or https:// URL")
    deadline = time.monotonic() + timeout_s
    # trust_env=False: a server-side fetch must not pick up whatever proxy the shell had.
    client = httpx.Client(
        follow_redirects=True, max_redirects=3, timeout=timeout_s, trust_env=False
    )
    try:
        with client, client.stream("GET", url, headers={"Accept": "image/*"}) as response:
            if response.status_code != 200:
                raise RequestError(400, f"image_url answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise RequestError(413, f"image_url is larger than {max_bytes} bytes")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(413, f"image_url is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise RequestError(400, f"image_url took longer than {timeout_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise RequestError(400, f"image_url took longer than {timeout_s:g} s") from None
    except httpx.HTTPError as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RequestError(400, f"couldn't fetch image_url: {detail}") from None
