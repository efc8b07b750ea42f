"""What a search asks: weighted terms plus k, the table, dedupe and the generate policy.

Every surface builds one of these (the CLI from its arguments, the server from a request, the
Python API from its call) and hands it to `engine.run_query`; nothing else decides what a
search means. The query syntax is rclip's:

    cat - grass + 2:./dog.jpg        terms joined by " + " / " - " (spaces around the sign)
    0.5:a red car                    `N:` weighs a term (default 1; the sign comes from + / -)
    ./x.jpg  /abs/x.jpg  ../x.jpg  ~/x.jpg  file:///x.jpg     an image file
    http://...  https://...          an image URL, fetched only where the surface allows it
    "a red car"                      one pair of surrounding quotes is dropped

Scoring: each term's embedding is L2-normalised and multiplied by its weight; the query vector
is their sum, renormalised to unit length. So a score is always a cosine in [-1, 1], the same
scale as a one-term query, and weights are relative: `2:cat + 2:dog` is `cat + dog`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

TEXT, IMAGE, IMAGE_URL, LIKE, EMBEDDING = "text", "image", "image_url", "like", "embedding"
KINDS = (TEXT, IMAGE, IMAGE_URL, LIKE, EMBEDDING)
IMAGES, TEXTS = "images", "texts"  # the tables (as the store names them)
GENERATE_MODES = ("auto", "never", "always")
MAX_TEXT_CHARS = 1000  # CLIP reads 77 tokens; anything far longer is a mistake or abuse
MAX_TERMS = 16  # more is a mistake; each term costs a forward pass share
CANCEL_NORM = 1e-4  # |sum of weighted unit vectors| below this: the terms cancel out

IMAGE_PREFIXES = ("./", "../", "/", "~/", "file://")
URL_PREFIXES = ("http://", "https://")
# a + or - with whitespace (or the string's edge) on both sides: the operators
_OPERATOR = re.compile(r"(?<!\S)([+-])(?!\S)")
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(?!//)(.*)$", re.DOTALL)


class QueryError(ValueError):
    """A query that can't run, in one line naming the input and the cause.

    The one exception type a bad query raises on every surface; `status` is what the server
    answers with (400 bad input, 403 not allowed here, 404 unknown id, 413 too large, 503
    busy) and `headers` what it adds (Retry-After)."""

    def __init__(self, message: str, status: int = 400, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Term:
    """One weighted part of a query. `value` by kind: text str; image a path, bytes or a PIL
    image; image_url an http(s) URL; like a stored image id; embedding a (D,) vector."""

    kind: str
    value: Any
    weight: float = 1.0
    label: str | None = None  # how errors name it (a file name, "the uploaded image", ...)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise QueryError(f"unknown term kind {self.kind!r}: use one of {', '.join(KINDS)}")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise QueryError(f"{self.name}: weight must be a number, not {weight!r}")
        if not math.isfinite(weight) or weight == 0:
            raise QueryError(f"{self.name}: weight must be a finite, non-zero number, not {weight}")
        object.__setattr__(self, "weight", float(weight))
        if self.kind == TEXT:
            if not isinstance(self.value, str):
                raise QueryError("a text term must be a string")
            if not self.value.strip():
                raise QueryError("empty query: give some text to search for")
            if len(self.value) > MAX_TEXT_CHARS:
                raise QueryError(f"a text term is longer than {MAX_TEXT_CHARS} characters")
        elif self.kind == LIKE:
            if isinstance(self.value, bool) or not isinstance(self.value, int | np.integer):
                raise QueryError(f"like must be an image id (an integer), not {self.value!r}")
            if self.value < 0:
                raise QueryError(f"like must be an image id (0 or more), not {self.value}")
            object.__setattr__(self, "value", int(self.value))
        elif self.kind == IMAGE_URL:
            if not isinstance(self.value, str) or not self.value.startswith(URL_PREFIXES):
                raise QueryError("image_url must be an http:// or https:// URL")

    # constructors that read well at the call site: Term.text("cat", -1)
    @classmethod
    def text(cls, text: str, weight: float = 1.0) -> Term:
        return cls(TEXT, text, weight)

    @classmethod
    def image(cls, image: Any, weight: float = 1.0, label: str | None = None) -> Term:
        return cls(IMAGE, image, weight, label)

    @classmethod
    def like(cls, image_id: int, weight: float = 1.0) -> Term:
        return cls(LIKE, image_id, weight)

    @classmethod
    def embedding(cls, vector: Any, weight: float = 1.0) -> Term:
        return cls(EMBEDDING, vector, weight)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == TEXT:
            return repr(self.value)
        if self.kind == IMAGE and isinstance(self.value, str | os.PathLike):
            return str(self.value)
        if self.kind in (IMAGE_URL, LIKE):
            return f"{self.kind} {self.value}"
        return f"the {self.kind}"

    def describe(self) -> dict[str, Any]:
        """JSON-able: how the query was read (the page shows it; --json prints it)."""
        out: dict[str, Any] = {"type": self.kind, "weight": self.weight}
        if self.kind in (TEXT, LIKE):
            out[{"text": "text", "like": "id"}[self.kind]] = self.value
        elif self.kind == IMAGE_URL:
            out["url"] = self.value
        elif self.kind == IMAGE and isinstance(self.value, str | os.PathLike):
            out["path"] = str(self.value)
        return out


@dataclass(frozen=True)
class Query:
    """A whole search: the terms, how many results, from which table, and what else to do."""

    terms: tuple[Term, ...]
    k: int = 10
    table: str = IMAGES
    dedupe: bool = False
    generate: str = "never"  # auto: draw a picture when the best score is below threshold
    threshold: float | None = None  # auto's cut-off (None: calibrated on the collection)
    fetch: int | None = None  # look at this many neighbours before dedupe/exclusion (>= k)
    seed: int = 0  # the generated picture's noise
    filters: Any = None  # a vqret.retrieval.filters.Filters: which images may be results
    columns: tuple[str, ...] = ()  # row columns to return with each hit (taken, camera...)
    per_video: int | None = None  # at most this many hits of one video (its best moments)
    options: dict[str, Any] = field(default_factory=dict, compare=False)  # surface extras

    def __post_init__(self) -> None:
        terms = tuple(self.terms)
        object.__setattr__(self, "terms", terms)
        if not terms:
            raise QueryError("empty query: give some text to search for")
        if len(terms) > MAX_TERMS:
            raise QueryError(f"a query has at most {MAX_TERMS} terms, not {len(terms)}")
        for term in terms:
            if not isinstance(term, Term):
                raise QueryError(f"a query's terms must be Terms, not {type(term).__name__}")
        if isinstance(self.k, bool) or not isinstance(self.k, int | np.integer) or self.k < 1:
            raise QueryError(f"k must be an integer, 1 or more, not {self.k!r}")
        object.__setattr__(self, "k", int(self.k))
        if self.table not in (IMAGES, TEXTS):
            raise QueryError(f"table must be {IMAGES} or {TEXTS}, not {self.table!r}")
        if self.generate not in GENERATE_MODES:
            raise QueryError(
                f"generate must be auto, never or always, not {self.generate!r}"
            )
        if self.table == TEXTS and self.dedupe:
            raise QueryError("dedupe applies to image results, not to the texts table")
        if self.table == TEXTS and self.generate == "always":
            raise QueryError("generate always draws an image: it can't answer the texts table")
        if self.threshold is not None and not (
            isinstance(self.threshold, int | float) and math.isfinite(self.threshold)
        ):
            raise QueryError(f"threshold must be a number, not {self.threshold!r}")
        if self.fetch is not None and (not isinstance(self.fetch, int) or self.fetch < 1):
            raise QueryError(f"fetch must be an integer, 1 or more, not {self.fetch!r}")
        columns = self.columns
        if isinstance(columns, str):
            columns = tuple(c for c in columns.split(","))
        columns = tuple(str(c).strip() for c in columns)
        if any(not c for c in columns):
            raise QueryError("columns must be column names like taken,camera")
        object.__setattr__(self, "columns", columns)
        if columns and self.table == TEXTS:
            raise QueryError("columns are the images' row columns: not for the texts table")
        if self.per_video is not None and (
            isinstance(self.per_video, bool) or not isinstance(self.per_video, int)
            or self.per_video < 1
        ):
            raise QueryError(f"per_video must be an integer, 1 or more, not {self.per_video!r}")
        if self.filters is not None:
            from .filters import Filters

            if not isinstance(self.filters, Filters):
                raise QueryError(f"filters must be a Filters, not {type(self.filters).__name__}")
            if self.table == TEXTS and self.filters.selects_rows:
                raise QueryError("filters restrict images: they can't apply to the texts table")

    @property
    def like_ids(self) -> list[int]:
        """Stored images the query is "more like": never results themselves."""
        return [t.value for t in self.terms if t.kind == LIKE]

    @property
    def prompt(self) -> str:
        """The query as text: a generated picture's prompt and file name."""
        parts = []
        for i, term in enumerate(self.terms):
            sign = "-" if term.weight < 0 else "+"
            weight = abs(term.weight)
            body = term.value if term.kind == TEXT else term.name
            body = body if weight == 1 else f"{weight:g}:{body}"
            parts.append(body if i == 0 and sign == "+" else f"{sign} {body}")
        return " ".join(parts)

    @property
    def single_text(self) -> str | None:
        """The text when the query is one text term of positive weight, else None."""
        if len(self.terms) == 1 and self.terms[0].kind == TEXT and self.terms[0].weight > 0:
            return self.terms[0].value
        return None

    def with_(self, **changes: Any) -> Query:
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """How the query was read: the terms with their weights, and the settings."""
        out: dict[str, Any] = {"terms": [t.describe() for t in self.terms], "k": self.k,
                               "table": self.table, "dedupe": self.dedupe,
                               "generate": self.generate}
        if self.filters is not None and self.filters.describe():
            out["filters"] = self.filters.describe()
        if len(self.terms) == 1:  # one term: also its kind at the top, as before
            out.update({k: v for k, v in self.terms[0].describe().items() if k != "weight"})
        return out


# --------------------------------------------------------------------------------------------
# The syntax
# --------------------------------------------------------------------------------------------


def parse_terms(text: str | Sequence[str], *, files: bool = True, urls: bool = True,
                sign: float = 1.0) -> list[Term]:
    """Query syntax (module docstring) -> terms. A sequence (the CLI's arguments) is read as
    its items joined by spaces. `files`/`urls`: whether image files / URLs may be named here
    (a server never reads files named by a request; it fetches URLs only when allowed)."""
    if not isinstance(text, str):
        if not all(isinstance(part, str) for part in text):
            raise QueryError("q must be a string")
        text = " ".join(text)
    stripped = text.strip()
    if not stripped:
        raise QueryError("empty query: give some text to search for")
    parts = _OPERATOR.split(stripped)
    # parts = [first, op, term, op, term, ...]; first is "" when the query starts with + or -
    terms = []
    items = [("+", parts[0])] + list(zip(parts[1::2], parts[2::2], strict=True))
    for position, (operator, raw) in enumerate(items):
        body = raw.strip()
        if not body:
            if position == 0 and len(items) > 1:
                continue  # "- grass": a leading sign
            raise QueryError(f"nothing after {operator!r} in {stripped!r}: each + or - needs "
                             "a term after it (put spaces around the sign)")
        term_sign = sign * (-1.0 if operator == "-" else 1.0)
        terms.append(parse_term(body, files=files, urls=urls, sign=term_sign))
    return terms


def parse_term(raw: str, *, files: bool = True, urls: bool = True, sign: float = 1.0) -> Term:
    """One term of the syntax: `[N:]text`, `[N:]./image.jpg` or `[N:]https://...`."""
    body = raw.strip()
    weight = 1.0
    match = _WEIGHT.match(body)
    if match:
        weight = float(match.group(1))
        body = match.group(2).strip()
        if weight == 0:
            raise QueryError(f"{raw.strip()!r}: weight must be a finite, non-zero number, not 0")
        if not body:
            raise QueryError(f"{raw.strip()!r}: nothing after the weight")
    body = _unquote(body)
    weight *= sign
    if body.startswith(URL_PREFIXES):
        if not urls:
            raise QueryError(
                f"{body}: image URLs are not fetched here: this server fetches URLs only when "
                "started with --allow-url-queries; send the image itself instead", status=403,
            )
        return Term(IMAGE_URL, body, weight)
    if body.startswith(IMAGE_PREFIXES):
        if not files:
            raise QueryError(
                f"{body}: a server query can't name a file on the server; upload the image "
                "instead (field image, or terms [{\"image\": BASE64}])"
            )
        return Term(IMAGE, _file_path(body), weight, label=body)
    return Term(TEXT, body, weight)


def _unquote(body: str) -> str:
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
        return body[1:-1].strip()
    return body


def _file_path(body: str) -> str:
    if body.startswith("file://"):
        return unquote(urlparse(body).path)
    return str(Path(body).expanduser()) if body.startswith("~/") else body


def weighted(raw: str, kind_parser, *, sign: float = 1.0) -> tuple[float, Any]:
    """`[N:]value` -> (signed weight, kind_parser(value)): for --like 0.5:42 and friends."""
    match = _WEIGHT.match(raw.strip())
    weight, body = (float(match.group(1)), match.group(2)) if match else (1.0, raw)
    return weight * sign, kind_parser(body.strip())


def build_query(
    q: str | Sequence[str] | None = None,
    *,
    terms: Iterable[Term] = (),
    files: bool = True,
    urls: bool = True,
    **settings: Any,
) -> Query:
    """The query syntax `q` (may be None) plus explicit terms -> a Query with `settings`."""
    all_terms = list(parse_terms(q, files=files, urls=urls)) if q is not None else []
    all_terms.extend(terms)
    return Query(tuple(all_terms), **settings)


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """(T, D) term embeddings and T weights -> the (D,) unit query vector (module docstring).

    Raises QueryError when the weighted sum is (near) zero: `cat - cat` asks for nothing."""
    vectors = np.asarray(vectors, np.float32)
    if len(vectors) == 1:  # one term: its unit vector, whatever its weight's size
        norm = float(np.sqrt(vectors[0] @ vectors[0]))
        if not (math.isfinite(norm) and norm > 0):
            raise QueryError("a term's embedding must be a finite, non-zero vector")
        return vectors[0] * np.float32(math.copysign(1.0, weights[0]) / norm)
    norms = np.sqrt(np.einsum("td,td->t", vectors, vectors))  # (T,)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise QueryError("a term's embedding must be a finite, non-zero vector")
    scale = np.asarray(weights, np.float32) / norms  # (T,): weight over norm, per term
    total = scale @ vectors  # (D,) the weighted sum of unit vectors
    norm = float(np.sqrt(total @ total))
    if norm < CANCEL_NORM * max(1.0, float(np.abs(scale * norms).sum())):
        raise QueryError("the terms cancel out: their weighted sum is zero, so nothing can "
                         "be ranked (change a weight or a term)")
    return total / np.float32(norm)
