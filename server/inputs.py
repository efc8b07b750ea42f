"""Checking what a request sends: numbers, base64 images, vectors, and URLs to fetch.

Every failure is a RequestError, which the server turns into a 4xx and a one-line JSON error.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from vqret.retrieval.query import QueryError


class RequestError(QueryError):
    """A bad request: becomes an HTTP status and a one-line JSON error. A QueryError (the
    engine's one error type), built status first as the server's code reads best."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message, status, headers)


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
