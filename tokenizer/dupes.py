"""Moved to vqret.retrieval.dupes: the near-duplicate finder reads store rows and runs no
model (the reason is in that module's docstring). Re-exported for code that imports it from
here."""

from vqret.retrieval.dupes import (
    BAND_SIZE,
    BANDS,
    CODES_THRESHOLD,
    DEPTH,
    MAX_BUCKET,
    THRESHOLD,
    WINDOW,
    DupeGroup,
    DupeReport,
    candidate_pairs,
    find_duplicates,
)

__all__ = [
    "BANDS",
    "BAND_SIZE",
    "CODES_THRESHOLD",
    "DEPTH",
    "MAX_BUCKET",
    "THRESHOLD",
    "WINDOW",
    "DupeGroup",
    "DupeReport",
    "candidate_pairs",
    "find_duplicates",
]
