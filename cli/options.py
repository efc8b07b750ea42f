"""Option parsing shared by the commands that train models."""

from __future__ import annotations

import json
from typing import Any


def parse_overrides(items: list[str], example: str) -> dict[str, Any]:
    """`--set KEY=VALUE` items -> {KEY: VALUE}, VALUE read as JSON where it parses (numbers,
    lists, true/false) and kept as a bare string otherwise (e.g. quantizer=fsq)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. {example}), got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides
