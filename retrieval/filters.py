"""Search within: a query's filters -> the ids of the images that pass, by DuckDB SQL.

    Filters(where="taken >= '2023-07-01' AND camera LIKE '%Pixel%'", folder="trips/2023",
            after="2023-07-01", before="2023-08-01", types=("jpg", "png"), min_score=0.2)

Every filter becomes one SQL boolean expression over a view `rows` of the images table (every
column but the vectors and codes, plus the conveniences below), run by DuckDB over the
store's rows as Arrow (zero-copy: pandas and polars users read the same columns):
- `where`: the user's own expression, as it is;
- `folder` (`--in`): a path prefix ("trips/2023" takes trips/2023/...), or a glob when it has
  * ? or [ ("*/beach/*.jpg", DuckDB's GLOB);
- `after` / `before`: the capture time (`taken`: EXIF, else the file's time) at or after /
  strictly before a date or a date-time;
- `types`: file types by extension, case-insensitive ("jpg" also takes .jpeg);
- `camera`: a case-insensitive substring of the camera's make and model;
- `min_score` is not SQL: the engine drops hits scoring below it.
Conveniences in `rows`: `type` (the lower-case extension), `camera` (make and model),
`taken` (the capture time as the camera wrote it, local wall-clock: the file's mtime where a
row has none, e.g. an old store not re-indexed yet) and `taken_utc` (the instant, when the
offset is known; else the same wall-clock time).

The SQL runs sandboxed, whoever sends it (a server passes its requests' SQL here too): one
in-memory DuckDB per collection, with no file system, network or extension access
(`enable_external_access = false`, auto-install/load off) and its configuration locked, so
`read_csv('/etc/passwd')`, COPY, ATTACH, INSTALL and SET all fail; the expression is checked
to be a single SELECT over `rows` before it runs. Any failure is a QueryError naming it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .query import QueryError

if TYPE_CHECKING:
    import pyarrow as pa

MAX_WHERE_CHARS = 2000
GLOB_CHARS = re.compile(r"[*?\[]")
# vectors and code grids stay out of the SQL view: big, and nothing to filter on
HIDDEN_COLUMNS = ("embedding", "codes")
SANDBOX = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "lock_configuration": True,
}
TYPE_ALIASES = {"jpg": ("jpg", "jpeg"), "jpeg": ("jpg", "jpeg"), "tif": ("tif", "tiff"),
                "tiff": ("tif", "tiff")}


@dataclass(frozen=True)
class Filters:
    """What a search is restricted to; every field optional, all of them ANDed."""

    where: str | None = None  # SQL boolean expression over `rows`
    folder: str | None = None  # --in: a path prefix or a glob
    after: str | dt.date | None = None  # taken >= after
    before: str | dt.date | None = None  # taken < before
    types: tuple[str, ...] = ()  # file types: ("jpg", "png")
    camera: str | None = None  # substring of "make model", any case
    min_score: float | None = None  # hits scoring below are dropped (not SQL)

    def __post_init__(self) -> None:
        if self.where is not None:
            if not isinstance(self.where, str) or not self.where.strip():
                raise QueryError("where must be a SQL condition, e.g. \"camera LIKE '%Pixel%'\"")
            if len(self.where) > MAX_WHERE_CHARS:
                raise QueryError(f"where is longer than {MAX_WHERE_CHARS} characters")
        for name in ("folder", "camera"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise QueryError(f"{name} must be a non-empty string")
        types = self.types
        if isinstance(types, str):
            types = tuple(t for t in types.split(","))
        clean = tuple(str(t).strip().lower().lstrip(".") for t in types)
        if any(not t or not t.isalnum() for t in clean):
            raise QueryError(f"type must be file types like jpg,png, not {','.join(types)!r}")
        object.__setattr__(self, "types", clean)
        for name in ("after", "before"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _moment(value, name))
        if (self.after is not None and self.before is not None
                and _utc(self.after) >= _utc(self.before)):
            raise QueryError(f"after ({self.after}) must be earlier than before ({self.before})")
        if self.min_score is not None and (
            isinstance(self.min_score, bool) or not isinstance(self.min_score, int | float)
            or not math.isfinite(self.min_score)
        ):
            raise QueryError(f"min_score must be a number, not {self.min_score!r}")

    @property
    def selects_rows(self) -> bool:
        """Whether any filter restricts rows (min_score only trims the hits)."""
        return any(getattr(self, f.name) not in (None, ()) for f in fields(self)
                   if f.name != "min_score")

    def describe(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value not in (None, ()):
                out[f.name] = value.isoformat() if isinstance(value, dt.datetime) else value
        if "types" in out:
            out["types"] = list(out["types"])
        return out


def _moment(value: Any, name: str) -> dt.datetime:
    """A date or date-time (ISO 8601; a date is its midnight). Without an offset it is a
    wall-clock time, compared with `taken` as the camera wrote it (July 4th is the day where
    the photo was taken); with one, an instant, compared with `taken` less its offset."""
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise QueryError(f"{name} must be a date like 2023-07-01 (or 2023-07-01T18:30), "
                             f"not {value!r}") from None
    raise QueryError(f"{name} must be a date like 2023-07-01, not {value!r}")


def _utc(moment: dt.datetime) -> dt.datetime:
    """An instant as naive UTC; a wall-clock time as it is."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(dt.timezone.utc).replace(tzinfo=None)


class RowFilter:
    """One collection's sandboxed DuckDB over its rows, re-read when the store changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one connection: one statement at a time
        self._generation: int | None = None
        self._con: Any = None
        self.columns: list[str] = []

    def passing_ids(self, store: Any, filters: Filters) -> np.ndarray:
        """int64 ids of the images that pass every row filter, ascending."""
        sql, params = self.condition(filters)
        with self._lock:
            self._refresh(store)
            self._check(sql)
            try:
                found = self._con.execute(f"SELECT id FROM rows WHERE {sql}", params)
                ids = found.fetchnumpy()["id"]
            except Exception as e:  # noqa: BLE001 - duckdb's errors: binder, parser, permission
                hint = ""
                if "not found" in str(e):
                    hint = f" (the columns: {', '.join(self.columns)})"
                raise QueryError(f"where: {_first_line(e)}{hint}") from None
        return np.sort(np.asarray(ids, np.int64))

    def values(self, store: Any, ids: list[int], columns: tuple[str, ...]) -> dict[int, dict]:
        """id -> {column: value} for `columns` of the `rows` view (the stored columns and the
        conveniences), JSON-able: times as ISO 8601 text."""
        with self._lock:
            self._refresh(store)
            unknown = [c for c in columns if c not in self.columns or c in HIDDEN_COLUMNS]
            if unknown:
                raise QueryError(f"unknown column {unknown[0]!r}: this store has "
                                 f"{', '.join(self.columns)}")
            if not ids:
                return {}
            names = ", ".join(f'"{c}"' for c in columns)
            found = self._con.execute(
                f"SELECT id, {names} FROM rows WHERE id IN (SELECT unnest(?))", [list(ids)]
            ).fetchall()
        return {row[0]: {c: _jsonable(v) for c, v in zip(columns, row[1:], strict=True)}
                for row in found}

    def condition(self, filters: Filters) -> tuple[str, list[Any]]:
        """The filters as one SQL condition with its parameters."""
        parts: list[str] = []
        params: list[Any] = []
        if filters.where is not None:
            parts.append(f"({filters.where})")
        if filters.folder is not None:
            folder = filters.folder.strip().strip("/")
            if GLOB_CHARS.search(folder):
                parts.append("path GLOB ?")
                params.append(folder)
            else:
                parts.append("(path = ? OR starts_with(path, ?))")
                params += [folder, folder + "/"]
        for moment, operator in ((filters.after, ">="), (filters.before, "<")):
            if moment is None:
                continue
            # a wall-clock bound compares with the wall-clock time; an instant with the instant
            left = "taken" if moment.tzinfo is None else "taken_utc"
            parts.append(f"{left} {operator} ?")
            params.append(_utc(moment))
        if filters.types:
            wanted = sorted({alias for t in filters.types for alias in TYPE_ALIASES.get(t, (t,))})
            parts.append(f"type IN ({', '.join('?' for _ in wanted)})")
            params += wanted
        if filters.camera is not None:
            parts.append("camera ILIKE ?")
            params.append("%" + filters.camera.replace("%", r"\%").replace("_", r"\_") + "%")
        return " AND ".join(parts) or "TRUE", params

    def _check(self, sql: str) -> None:
        try:
            statements = self._con.extract_statements(f"SELECT id FROM rows WHERE {sql}")
        except Exception as e:  # noqa: BLE001 - duckdb's ParserException and friends
            raise QueryError(f"where: {_first_line(e)}") from None
        if len(statements) != 1 or "SELECT" not in str(statements[0].type):
            raise QueryError("where must be one condition, not several statements")

    def _refresh(self, store: Any) -> None:
        if self._con is not None and self._generation == store.generation:
            return
        import duckdb

        table = store.read_table([c for c in _columns(store) if c not in HIDDEN_COLUMNS])
        if self._con is not None:
            self._con.close()
        self._con = duckdb.connect(":memory:", config=SANDBOX)
        self._con.register("rows_table", table)
        self._con.execute(_VIEW_SQL.format(extra=_extra_columns(table),
                                           hidden=_replaced(table)))
        self._generation = store.generation
        self.columns = [c for c in self._con.execute("SELECT * FROM rows LIMIT 0")
                        .fetchnumpy()]


def _columns(store: Any) -> list[str]:
    """The images table's columns as its parts hold them (an old store: fewer)."""
    import pyarrow.parquet as pq

    from .store_layout import IMAGES

    parts = store.parts(IMAGES)
    if not parts:
        return list(store.read_table().schema.names)
    return list(pq.read_schema(store.path / IMAGES / parts[0]).names)


_VIEW_SQL = """
CREATE TEMP VIEW rows AS SELECT *{hidden}{extra} FROM rows_table
"""


def _replaced(table: pa.Table) -> str:
    """Stored columns the view computes anew (taken: the mtime where EXIF had none)."""
    return " EXCLUDE (taken)" if "taken" in table.column_names else ""


def _extra_columns(table: pa.Table) -> str:
    """The conveniences: type, camera, and taken from mtime where the store has none yet."""
    names = set(table.column_names)
    extra = [r"lower(regexp_extract(path, '\.([^./]+)$', 1)) AS type"] if "type" not in names \
        else []
    if "camera" not in names:
        make = "camera_make" if "camera_make" in names else "NULL"
        model = "camera_model" if "camera_model" in names else "NULL"
        extra.append(f"nullif(concat_ws(' ', {make}, {model}), '') AS camera")
    mtime = "make_timestamp(mtime_ns // 1000)" if "mtime_ns" in names else "NULL::TIMESTAMP"
    offset = "taken_offset_min" if "taken_offset_min" in names else "NULL::INTEGER"
    taken = f"coalesce(taken, {mtime})" if "taken" in names else mtime
    extra.append(f"{taken} AS taken")
    extra.append(f"{taken} - to_minutes(coalesce({offset}, 0)) AS taken_utc")
    return "".join(f", {e}" for e in extra)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line.replace("Binder Error: ", "").replace("Parser Error: ", "")
