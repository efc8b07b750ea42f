"""Damaged parts: told by the size and checksum recorded when a part was written.

A part (or an index file) damaged on disk, truncated or with bytes flipped, costs its rows,
not the store:

- When a writer writes a part it records `{"bytes", "crc32", "rows"}` for it in the manifest
  (`tables[table]["checks"][part]`), and writes the part's *recovery copy*:
  `recovery/<table>/<part>`, its rows without their vectors (ids, paths, hashes, metadata;
  ~5% of the part at d = 512). The search index's `<table>.json` records the same size and
  checksum of `<table>.faiss`.
- A reader checks every part's size (one stat each) once per store generation, and its
  checksum (CRC-32, 2-3 GB/s on one core) once per process per file, cached by (path,
  size, mtime): a server pays it once, a cold `vqret search` every time (+80-140 ms at 100k
  rows of d = 512, benchmarks/README.md); VQRET_VERIFY=size leaves the checksums out. A
  damaged part is skipped: search answers from the healthy ones and says how many rows
  are missing.
- `vqret index` re-embeds a damaged part's rows from their files (repair.py), under their
  old ids (from the recovery copy), and the damaged index is rebuilt.

A store written before this (no checks in its manifest) opens as before: its parts are not
checksummed, but one whose Parquet footer (or, when read, its rows) can't be read is reported
and skipped the same way.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

RECOVERY = "recovery"  # <store>/recovery/<table>/<part>: the part's rows without vectors
# Columns a recovery copy leaves out: what re-embedding gives back (embedding), or what a
# later command recomputes (codes: `vqret tokenizer encode`).
NOT_RECOVERED = ("embedding", "codes", "codes_tokenizer")
CRC_CHUNK = 1 << 22
# "full" (default): sizes and checksums; "size": sizes only, for a process that must not read
# every part's bytes once (a server over a store of hundreds of GB)
VERIFY_ENV = "VQRET_VERIFY"

# (path, size, mtime_ns) -> CRC-32 of the file's bytes: each file is read once per process
_crcs: dict[tuple[str, int, int], int] = {}
# (path, size, mtime_ns) -> why pyarrow could not read a part that had no checksum
_unreadable: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class DamagedPart:
    table: str
    part: str
    cause: str  # "truncated (10 of 4,096 bytes)", "checksum mismatch", "missing", ...
    rows: int | None  # the rows it held, when the manifest recorded them

    @property
    def missing(self) -> bool:
        return self.cause == "missing"

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "part": self.part, "cause": self.cause, "rows": self.rows}


def crc32_file(path: Path | str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_check(path: Path | str, rows: int | None = None) -> dict[str, int]:
    """What a manifest records of a file just written: its size, CRC-32 (and rows)."""
    stat = os.stat(path)
    check = {"bytes": stat.st_size, "crc32": crc32_file(path)}
    _crcs[(str(path), stat.st_size, stat.st_mtime_ns)] = check["crc32"]
    if rows is not None:
        check["rows"] = rows
    return check


def file_damage(path: Path, check: dict[str, Any] | None) -> str | None:
    """Why the file at `path` is not the one `check` recorded, or None when it is (or when
    nothing was recorded and it exists)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _unreadable:
        return _unreadable[key]
    if not check:
        if path.suffix != ".parquet":
            return None
        # a part written before checks: its footer at least (a truncated file has none)
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as e:
            return mark_unreadable(path, e)
        return None
    recorded = int(check["bytes"])
    if stat.st_size != recorded:
        what = "truncated" if stat.st_size < recorded else "grown"
        return f"{what} ({stat.st_size:,} of {recorded:,} bytes)"
    if "crc32" not in check or os.environ.get(VERIFY_ENV, "full").lower() == "size":
        return None
    crc = _crcs.get(key)
    if crc is None:
        try:
            crc = _crcs[key] = crc32_file(path)
        except OSError as e:
            return f"unreadable ({e.strerror or e})"
    if crc != int(check["crc32"]):
        return "checksum mismatch (its bytes changed since it was written)"
    return None


def mark_unreadable(path: Path, error: BaseException) -> str:
    """Remember (for this process) that pyarrow failed on a part; returns the cause."""
    from .one_line import first_line

    cause = f"unreadable Parquet ({first_line(error)})"
    try:
        stat = os.stat(path)
        _unreadable[(str(path), stat.st_size, stat.st_mtime_ns)] = cause
    except OSError:
        pass
    return cause


def damaged_parts(path: Path, manifest: dict[str, Any], table: str) -> list[DamagedPart]:
    """The parts of `table` the manifest lists whose file is missing or not as written."""
    entry = manifest["tables"][table]
    checks = entry.get("checks") or {}
    out = []
    for part in entry["parts"]:
        check = checks.get(part)
        cause = file_damage(path / table / part, check)
        if cause is not None:
            rows = check.get("rows") if check else None
            out.append(DamagedPart(table, part, cause, rows))
    return out


def unavailable_note(damaged: list[DamagedPart]) -> str | None:
    """The one line a search result carries while some parts are damaged."""
    if not damaged:
        return None
    counts = [d.rows for d in damaged]
    rows = f"{sum(counts):,} rows" if None not in counts else "some rows"
    names = ", ".join(f"{d.table}/{d.part} {d.cause}" for d in damaged)
    return f"{rows} unavailable: part {names}; run `vqret index` to repair"


# ---- the recovery copy ----------------------------------------------------------------------
def recovery_path(store_path: Path, table: str, part: str) -> Path:
    return store_path / RECOVERY / table / part


def write_part_extras(store_path: Path, table: str, part: str, rows: pa.Table) -> dict:
    """After a part is written: its recovery copy, and the check the manifest records."""
    from .atomic import atomic_write

    keep = [c for c in rows.column_names if c not in NOT_RECOVERED]
    target = recovery_path(store_path, table, part)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: pq.write_table(rows.select(keep), tmp, compression="zstd"))
    check = file_check(store_path / table / part, rows.num_rows)
    check["recovery"] = file_check(target)
    return check


def read_recovery(store_path: Path, table: str, part: str,
                  check: dict[str, Any] | None = None) -> pa.Table | None:
    """A damaged part's rows without vectors, or None when there is no sound copy (missing,
    unreadable, or not as the part's `check` recorded it)."""
    path = recovery_path(store_path, table, part)
    if file_damage(path, (check or {}).get("recovery")) is not None:
        return None
    try:
        return pq.ParquetFile(path).read()
    except (OSError, pa.ArrowException):
        return None


def forget_parts(store_path: Path, table: str, parts: list[str]) -> None:
    """Remove the recovery copies of parts a commit superseded."""
    for part in parts:
        recovery_path(store_path, table, part).unlink(missing_ok=True)


def remove_stray_recovery(store_path: Path, table: str, live: set[str]) -> None:
    """Recovery copies of parts no manifest lists (a writer killed before it committed)."""
    folder = store_path / RECOVERY / table
    if folder.is_dir():
        for f in folder.iterdir():
            if f.name not in live:
                f.unlink(missing_ok=True)


def kept_checks(old: dict[str, Any] | None, parts: list[str],
                new: dict[str, dict]) -> dict[str, dict]:
    """The checks a manifest lists for `parts`: those just written, else those it had."""
    old = old or {}
    checks = {p: new[p] if p in new else old.get(p) for p in parts}
    return {p: check for p, check in checks.items() if check}
