"""What a file and its EXIF say about a photo: the metadata columns of the image table.

Two halves, because they run in different places:
- `read_facts(source)` reads what only the file's bytes know, from its header (Pillow parses
  the EXIF block without decoding a pixel): the displayed size, orientation, format, EXIF
  capture time, camera and GPS position. It runs beside the decode, in the local engine's
  decode workers and on the Ray engine's actors (from the bytes they already hold), or alone
  where nothing is decoded (a store upgrade, `read_facts_here`).
- `metadata_columns(facts, path, mtime_ns)` turns a batch of those facts and the listing's
  columns into the rows' columns, on the driver, with Arrow: the capture time falls back to
  the file's mtime, the folder comes from the path.

The capture time `taken` is the local wall-clock time where the photo was taken, as the camera
writes DateTimeOriginal, with `taken_offset_min` the minutes east of UTC when known (EXIF
OffsetTimeOriginal): the instant is `taken - taken_offset_min minutes`. Local time, because
"photos of July 4th" means the calendar day where they were taken, and EXIF without an offset
(most cameras before ~2018) knows nothing else. Without an EXIF time it is the file's mtime in
the indexing machine's time zone, with that zone's offset, and `taken_source` says which.

Garbage never raises here: a field that can't be read is null (and `taken` the mtime).
"""

from __future__ import annotations

import io
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import ExifTags, Image

from .images import _register_heif
from .store_layout import row_schema
from .urls import is_url

# What a header tells, as the image table's columns (store_layout.row_schema); width and
# height are the displayed size, after EXIF orientation.
FACT_COLUMNS = (
    "width", "height", "orientation", "file_type", "taken", "taken_offset_min", "camera_make",
    "camera_model", "gps_lat", "gps_lon",
)
FACTS_SCHEMA = pa.schema([row_schema(1).field(name) for name in FACT_COLUMNS])

# Formats and extensions that name another file type: an MPO is a JPEG with a second picture
# (many cameras write them), a HEIC is a HEIF, a .jpg a JPEG.
_FORMATS = {"mpo": "jpeg", "heic": "heif", "jpg": "jpeg", "jpe": "jpeg", "tif": "tiff"}
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
# "2023:07:04 21:15:00" (EXIF), with "-" or "T" as some writers have it
_EXIF_TIME = re.compile(r"^(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2})(?::(\d{2}))?(.*)$")
_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")
_MAX_TEXT = 200
# Pillow warns on every broken EXIF block it skips ("Corrupt EXIF data", "Tag data larger than
# file"): common in the wild, and each field read from one is null here anyway. A filter, not
# catch_warnings, which isn't thread-safe and the header reads run on threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
_FACTS_THREADS = 4  # header reads: I/O and Pillow's C parsers
_FACTS_CHUNK = 1 << 12


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What a file's header says; None where it says nothing (or garbage)."""

    width: int | None = None
    height: int | None = None
    orientation: int | None = None
    file_type: str | None = None
    taken: datetime | None = None  # naive: local wall-clock time
    taken_offset_min: int | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain values (the time as ISO text), to travel through Ray Data as one column."""
        out = asdict(self)
        out["taken"] = self.taken.isoformat() if self.taken else None
        return out

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> ImageFacts:
        taken = values.get("taken")
        values = {f.name: values.get(f.name) for f in fields(cls)}
        values["taken"] = datetime.fromisoformat(taken) if taken else None
        return cls(**values)


# --------------------------------------------------------------------------------------------
# One file's header -> ImageFacts
# --------------------------------------------------------------------------------------------


def read_facts(source: str | os.PathLike[str] | bytes | BinaryIO) -> ImageFacts:
    """The facts of one image (a path, an fsspec URL, bytes or a seekable stream), from its
    header only; an empty ImageFacts when it can't be opened at all. Never raises."""
    _register_heif()  # HEIC/AVIF openers, once per process
    try:
        fp, close = _open(source)
    except Exception:  # noqa: BLE001 - a file gone since it was decoded or listed
        return ImageFacts()
    try:
        with Image.open(fp) as img:
            return _facts(img)
    except Exception:  # noqa: BLE001 - not an image, or a header Pillow can't parse
        return ImageFacts()
    finally:
        if close:
            fp.close()


def _open(source: Any) -> tuple[BinaryIO, bool]:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source), True
    if isinstance(source, str | os.PathLike):
        if isinstance(source, str) and is_url(source):
            from .remote import open_url  # fsspec, imported only when a URL is read

            return open_url(source), True
        return open(source, "rb"), True
    return source, False


def _facts(img: Image.Image) -> ImageFacts:
    width, height = img.size
    file_type = _file_type(img.format)
    if img.format == "PNG" and "exif" not in img.info:
        # an eXIf chunk after the pixels: Pillow would decode the whole image to reach it
        return ImageFacts(width=width, height=height, file_type=file_type)
    exif = _safe(img.getexif)
    if not exif:  # none (most PNGs, stripped JPEGs), or unreadable
        return ImageFacts(width=width, height=height, file_type=file_type)
    base = ExifTags.Base
    orientation = _safe(lambda: _orientation(exif.get(base.Orientation)))
    if orientation in _TRANSPOSED:
        width, height = height, width
    photo = _safe(lambda: exif.get_ifd(ExifTags.IFD.Exif)) or {}
    gps = _safe(lambda: exif.get_ifd(ExifTags.IFD.GPSInfo)) or {}
    taken, offset = _safe(lambda: _taken(photo, exif)) or (None, None)
    lat, lon = _safe(lambda: _position(gps)) or (None, None)
    return ImageFacts(
        width=width,
        height=height,
        orientation=orientation,
        file_type=file_type,
        taken=taken,
        taken_offset_min=offset,
        camera_make=_safe(lambda: _text(exif.get(base.Make))),
        camera_model=_safe(lambda: _text(exif.get(base.Model))),
        gps_lat=lat,
        gps_lon=lon,
    )


def _safe(read: Callable[[], Any]) -> Any:
    """One field's reading: garbage (wrong types, truncated IFDs) is None, not an error."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - Pillow raises anything from struct.error to KeyError
        return None


def _file_type(name: str | None) -> str | None:
    if not name:
        return None
    name = name.lower().lstrip(".")
    return _FORMATS.get(name, name)


def file_type_of(name: str) -> str:
    """The file type a name or a user's word stands for: "IMG_1.JPG" or "jpg" -> "jpeg"."""
    return _file_type(name.rsplit(".", 1)[-1]) or ""


def _orientation(value: Any) -> int | None:
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _text(value: Any) -> str | None:
    """A camera's make or model: stripped, without NULs or control characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = "".join(ch for ch in value.split("\x00", 1)[0] if ch.isprintable()).strip()
    return value[:_MAX_TEXT] or None


def _taken(photo: Any, ifd0: Any) -> tuple[datetime | None, int | None]:
    """(DateTimeOriginal as local wall-clock time, its offset in minutes or None)."""
    base = ExifTags.Base
    value = photo.get(base.DateTimeOriginal) or ifd0.get(base.DateTimeOriginal)
    text = _text(value)
    match = _EXIF_TIME.match(text) if text else None
    if match is None:
        return None, None
    year, month, day, hour, minute = (int(g) for g in match.groups()[:5])
    second = int(match.group(6) or 0)
    try:
        taken = datetime(year, month, day, hour, minute, second)
    except ValueError:  # "0000:00:00 00:00:00", February 30th...
        return None, None
    if year < 1826:  # before the first photograph: a camera with its clock never set
        return None, None
    subsec = _text(photo.get(base.SubsecTimeOriginal))
    if subsec and subsec.isdigit():
        taken += timedelta(microseconds=int(subsec[:6].ljust(6, "0")))
    offset = _offset(_text(photo.get(base.OffsetTimeOriginal)))
    if offset is None:  # an ISO time with its offset ("2012-09-17T15:53:45-04:00")
        offset = _offset(match.group(7).strip())
    return taken, offset


def _offset(text: str | None) -> int | None:
    """"+05:30" -> 330 minutes east of UTC; None for anything else."""
    match = _OFFSET.match(text) if text else None
    if match is None:
        return None
    sign = -1 if match.group(1) == "-" else 1
    minutes = int(match.group(2)) * 60 + int(match.group(3))
    return sign * minutes if minutes <= 14 * 60 and int(match.group(3)) < 60 else None


def _position(gps: Any) -> tuple[float | None, float | None]:
    """(latitude, longitude) in decimal degrees, or Nones: refs N/S/E/W, rationals."""
    tag = ExifTags.GPS
    lat = _degrees(gps.get(tag.GPSLatitude), gps.get(tag.GPSLatitudeRef), "NS", 90)
    lon = _degrees(gps.get(tag.GPSLongitude), gps.get(tag.GPSLongitudeRef), "EW", 180)
    if lat is None or lon is None or (lat == 0 and lon == 0):
        # (0, 0) is what receivers without a fix write: no photo is taken off Africa's coast
        # at exactly that point
        return None, None
    return lat, lon


def _degrees(value: Any, ref: Any, refs: str, limit: float) -> float | None:
    """(degrees, minutes, seconds) rationals and a hemisphere letter -> signed degrees."""
    if not isinstance(value, tuple | list) or not 1 <= len(value) <= 3:
        return None
    parts = [float(v) for v in value]  # IFDRational with a zero denominator: nan
    if not all(math.isfinite(p) for p in parts):
        return None
    degrees = sum(p / 60**k for k, p in enumerate(parts))
    hemisphere = _text(ref)
    if hemisphere:
        hemisphere = hemisphere[0].upper()
        if hemisphere not in refs:
            return None
        degrees = -abs(degrees) if hemisphere == refs[1] else degrees
    return degrees if -limit <= degrees <= limit else None


# --------------------------------------------------------------------------------------------
# Many files' facts -> the rows' metadata columns
# --------------------------------------------------------------------------------------------

# Reads the facts of the named files anywhere (this process's threads, a Ray cluster): yields
# (index into names, facts) for each, in any order.
FactsReader = Callable[[Sequence[str]], Iterable[tuple[int, ImageFacts]]]


def read_facts_here(names: Sequence[str]) -> Iterator[tuple[int, ImageFacts]]:
    """The default FactsReader: a few threads of this process, answers in order."""
    with ThreadPoolExecutor(max_workers=_FACTS_THREADS) as pool:
        for start in range(0, len(names), _FACTS_CHUNK):
            yield from enumerate(pool.map(read_facts, names[start : start + _FACTS_CHUNK]), start)


def facts_in_order(reader: FactsReader, names: Sequence[str]) -> list[ImageFacts]:
    """The facts of `names`, in their order, from a reader answering in any order."""
    out: list[ImageFacts | None] = [None] * len(names)
    for i, facts in reader(names):
        out[i] = facts
    return [f if f is not None else ImageFacts() for f in out]


def facts_table(facts: Sequence[ImageFacts]) -> pa.Table:
    """ImageFacts as FACTS_SCHEMA columns."""
    return pa.table(
        {f.name: pa.array([getattr(x, f.name) for x in facts], f.type) for f in FACTS_SCHEMA},
        schema=FACTS_SCHEMA,
    )


def stored_facts(rows: pa.Table) -> pa.Table:
    """The facts rows already hold (FACTS_SCHEMA): a renamed, touched or copied file has the
    same bytes as its row, so the same header; only what the path and mtime decide changes."""
    exif = _one_array(pc.equal(rows["taken_source"], "exif"))
    columns = {}
    for f in FACTS_SCHEMA:
        column = _one_array(rows[f.name]).cast(f.type)
        if f.name in ("taken", "taken_offset_min"):  # an mtime fallback is no fact
            column = pc.if_else(exif, column, pa.scalar(None, f.type))
        columns[f.name] = column
    return pa.table(columns, schema=FACTS_SCHEMA)


def metadata_columns(
    facts: pa.Table, path: pa.Array | pa.ChunkedArray | Sequence[str],
    mtime_ns: pa.Array | pa.ChunkedArray | Sequence[int], root_url: str | None = None,
) -> dict[str, pa.Array]:
    """The image table's metadata columns (store_layout.METADATA_COLUMNS, plus width and
    height) of rows with these facts (FACTS_SCHEMA), paths and mtimes; `root_url`: the
    store's root when the paths are full URLs under it."""
    fact = {name: _one_array(facts[name]) for name in FACT_COLUMNS}
    path = _one_array(path).cast(pa.string())
    exif = pc.is_valid(fact["taken"])
    local, offset = _local_times(_one_array(mtime_ns).cast(pa.int64()))
    out = {
        "taken": pc.if_else(exif, fact["taken"], local),
        "taken_offset_min": pc.if_else(exif, fact["taken_offset_min"], offset),
        "taken_source": pc.if_else(exif, pa.scalar("exif"), pa.scalar("mtime")),
        "file_type": pc.coalesce(fact["file_type"], _extension_types(path)),
        "folder": folder_of(path, root_url),
    }
    for name in ("width", "height", "orientation", "camera_make", "camera_model", "gps_lat",
                 "gps_lon"):
        out[name] = fact[name]
    return out


def folder_of(path: pa.Array, root_url: str | None = None) -> pa.Array:
    """Each path's parent folder, relative to the indexed root ("" for the root itself)."""
    if root_url is not None:
        prefix = root_url.rstrip("/") + "/"
        inside = pc.starts_with(path, prefix)
        path = pc.if_else(inside, pc.utf8_slice_codeunits(path, len(prefix)), path)
    return pc.replace_substring_regex(path, pattern="(^|/)[^/]*$", replacement="")


def _extension_types(path: pa.Array) -> pa.Array:
    """The file type a path's extension names: for rows whose header can't be read."""
    ext = pc.utf8_lower(pc.replace_substring_regex(path, r"^.*\.([^./]+)$|^.*$", r"\1"))
    for alias, name in _FORMATS.items():
        ext = pc.if_else(pc.equal(ext, alias), pa.scalar(name), ext)
    return pc.if_else(pc.equal(ext, ""), pa.scalar(None, pa.string()), ext)


def _local_times(mtime_ns: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(local wall-clock time, offset in minutes) of each mtime, in this machine's zone."""
    ns = pc.fill_null(mtime_ns, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    valid = pc.is_valid(mtime_ns)
    seconds = ns // 1_000_000_000
    offsets = np.fromiter((_utc_offset(int(s)) for s in seconds), np.int64, len(seconds))
    local = ns // 1000 + offsets * 60_000_000
    mask = ~valid.to_numpy(zero_copy_only=False)
    return (
        pa.array(local, pa.timestamp("us"), mask=mask),
        pa.array(offsets.astype(np.int16), pa.int16(), mask=mask),
    )


def _utc_offset(seconds: int) -> int:
    try:
        return time.localtime(seconds).tm_gmtoff // 60
    except (OverflowError, OSError, ValueError):  # a clock far outside the C library's range
        return 0


def _one_array(values: pa.Array | pa.ChunkedArray | Sequence[Any]) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values if isinstance(values, pa.Array) else pa.array(values)


__all__ = [
    "FACT_COLUMNS",
    "FACTS_SCHEMA",
    "FactsReader",
    "ImageFacts",
    "facts_in_order",
    "facts_table",
    "file_type_of",
    "folder_of",
    "metadata_columns",
    "read_facts",
    "read_facts_here",
    "stored_facts",
]
