"""Metadata columns: EXIF and file facts read at index time, fallbacks, and old stores upgraded.

Past 500 lines because EXIF has many ways to be wrong, and each gets its own case here.

The photos are written here through Pillow (EXIF with and without an offset, cameras, GPS,
orientation); the real ones in ../shared/data are read too when present (CI has them).
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures.shapes import make_shape_folder
from PIL import ExifTags, Image, TiffImagePlugin, TiffTags
from PIL.TiffImagePlugin import IFDRational
from vqret.retrieval.indexer import index_folder
from vqret.retrieval.metadata import (
    ImageFacts,
    facts_table,
    file_type_of,
    metadata_columns,
    read_facts,
)
from vqret.retrieval.store import METADATA_COLUMNS, SCHEMA_VERSION, Store, StoreWriter
from vqret.retrieval.store_facts import metadata_coverage

# Pillow warns on each broken EXIF block; vqret filters those out, pytest shows them again
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BASE, IFD, GPS = ExifTags.Base, ExifTags.IFD, ExifTags.GPS


# ---- photos with EXIF, written through Pillow ----------------------------------------------


def _dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    value = abs(value)
    degrees, rest = int(value), (abs(value) - int(value)) * 60
    minutes = int(rest)
    return IFDRational(degrees), IFDRational(minutes), IFDRational(round((rest - minutes) * 6000),
                                                                   100)


def exif_photo(
    path: Path | None = None,
    size: tuple[int, int] = (64, 48),
    *,
    make: str | None = None,
    model: str | None = None,
    orientation: int | None = None,
    taken: str | None = None,
    offset: str | None = None,
    subsec: str | None = None,
    gps: tuple[float, float] | None = None,
    color: tuple[int, int, int] = (200, 40, 40),
    exif: bytes | None = None,
) -> bytes:
    """A JPEG with these EXIF tags (or the raw `exif` block), written to `path` if given."""
    ex = Image.Exif()
    if make is not None:
        ex[BASE.Make] = make
    if model is not None:
        ex[BASE.Model] = model
    if orientation is not None:
        ex[BASE.Orientation] = orientation
    photo = ex.get_ifd(IFD.Exif)
    for tag, value in ((BASE.DateTimeOriginal, taken), (BASE.OffsetTimeOriginal, offset),
                       (BASE.SubsecTimeOriginal, subsec)):
        if value is not None:
            photo[tag] = value
    if gps is not None:
        lat, lon = gps
        ex.get_ifd(IFD.GPSInfo).update({
            GPS.GPSLatitudeRef: "N" if lat >= 0 else "S", GPS.GPSLatitude: _dms(lat),
            GPS.GPSLongitudeRef: "E" if lon >= 0 else "W", GPS.GPSLongitude: _dms(lon),
        })
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG", exif=exif if exif is not None else ex)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(out.getvalue())
    return out.getvalue()


def raw_exif(*tags: tuple[int, int, object]) -> bytes:
    """An EXIF block whose IFD0 holds (tag, TIFF type, value) as given: any type for any tag."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"MM")
    for tag, kind, value in tags:
        ifd.tagtype[tag] = kind
        ifd[tag] = value
    return b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + ifd.tobytes(8)


def test_exif_fields_of_a_photo_written_through_pillow():
    data = exif_photo(size=(64, 48), make="  Canon\x00\x00", model="Canon EOS 5D\x00",
                      orientation=6, taken="2023:07:04 21:15:30", offset="-04:00",
                      subsec="25", gps=(-33.8568, 151.2153))
    facts = read_facts(data)
    assert facts.taken == datetime(2023, 7, 4, 21, 15, 30, 250_000)  # local wall clock
    assert facts.taken_offset_min == -240
    assert (facts.camera_make, facts.camera_model) == ("Canon", "Canon EOS 5D")
    assert facts.orientation == 6
    assert (facts.width, facts.height) == (48, 64)  # displayed: orientation 6 turns it
    assert facts.file_type == "jpeg"
    assert facts.gps_lat == pytest.approx(-33.8568, abs=1e-5)  # S: negative
    assert facts.gps_lon == pytest.approx(151.2153, abs=1e-5)
    # a path, bytes and a stream are read alike
    assert read_facts(io.BytesIO(data)) == facts


def test_file_types_are_the_decoded_format(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "really_a_png.jpg", "PNG")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.webp", "WEBP")
    assert read_facts(tmp_path / "really_a_png.jpg").file_type == "png"
    assert read_facts(tmp_path / "a.webp").file_type == "webp"
    assert [file_type_of(n) for n in ("IMG_1.JPG", "jpg", "x.tif", "b.heic")] == [
        "jpeg", "jpeg", "tiff", "heif"]


# ---- time zones --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "minutes"),
    [("+05:30", 330), ("-04:00", -240), ("+00:00", 0), ("+14:00", 840), ("-0930", -570),
     (None, None), ("+25:00", None), ("Z", None), ("garbage", None)],
)
def test_the_offset_of_the_capture_time(offset, minutes):
    facts = read_facts(exif_photo(taken="2023:07:04 21:15:30", offset=offset))
    assert facts.taken == datetime(2023, 7, 4, 21, 15, 30)  # the time as the camera wrote it
    assert facts.taken_offset_min == minutes


def test_the_instant_is_the_local_time_less_its_offset():
    """Two photos of the same instant in Paris and New York: different local times, one UTC
    moment once their offsets are taken off."""
    paris = read_facts(exif_photo(taken="2023:07:04 20:00:00", offset="+02:00"))
    new_york = read_facts(exif_photo(taken="2023:07:04 14:00:00", offset="-04:00"))
    as_utc = [f.taken - timedelta(minutes=f.taken_offset_min) for f in (paris, new_york)]
    assert as_utc[0] == as_utc[1] == datetime(2023, 7, 4, 18, 0)


def test_an_iso_time_with_its_offset_is_read_too():
    facts = read_facts(exif_photo(taken="2012-09-17T15:53:45-04:00"))
    assert (facts.taken, facts.taken_offset_min) == (datetime(2012, 9, 17, 15, 53, 45), -240)


@pytest.fixture
def zone(monkeypatch):
    """Set this process's time zone (TZ) for a test; put back afterwards."""

    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("name", "when", "local", "minutes"),
    [
        ("America/New_York", datetime(2023, 7, 4, 12, 0), datetime(2023, 7, 4, 8, 0), -240),
        ("America/New_York", datetime(2023, 1, 4, 12, 0), datetime(2023, 1, 4, 7, 0), -300),
        ("Asia/Kolkata", datetime(2023, 7, 4, 12, 0), datetime(2023, 7, 4, 17, 30), 330),
        ("UTC", datetime(2023, 7, 4, 12, 0), datetime(2023, 7, 4, 12, 0), 0),
    ],
)
def test_without_exif_the_time_is_the_mtime_in_the_local_zone(zone, name, when, local, minutes):
    zone(name)
    utc_ns = int((when - datetime(1970, 1, 1)).total_seconds()) * 10**9
    facts = facts_table([read_facts(exif_photo())])  # no EXIF time
    out = metadata_columns(facts, ["x.jpg"], [utc_ns])
    assert out["taken"].to_pylist() == [local]
    assert out["taken_offset_min"].to_pylist() == [minutes]
    assert out["taken_source"].to_pylist() == ["mtime"]


# ---- missing and garbage EXIF: fallbacks, never a crash --------------------------------------


def _full_exif() -> bytes:
    ex = Image.open(io.BytesIO(exif_photo(make="Canon", model="EOS", orientation=6,
                                          taken="2023:07:04 21:15:30", offset="+02:00",
                                          gps=(48.85, 2.35)))).getexif()
    return ex.tobytes()


GARBAGE = {
    "no EXIF": exif_photo(),
    "EXIF header only": exif_photo(exif=b"Exif\x00\x00"),
    "truncated TIFF header": exif_photo(exif=_full_exif()[:12]),
    "truncated IFD": exif_photo(exif=_full_exif()[:40]),
    "not TIFF at all": exif_photo(exif=b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 20),
    "wrong types": exif_photo(exif=raw_exif(
        (BASE.Orientation, TiffTags.ASCII, "six"), (BASE.Make, TiffTags.SHORT, 7),
        (BASE.Model, TiffTags.RATIONAL, IFDRational(1, 3)),
        (BASE.DateTimeOriginal, TiffTags.SHORT, 2023))),
    "orientation out of range": exif_photo(orientation=99),
    "a date of zeros": exif_photo(taken="0000:00:00 00:00:00"),
    "a blank date": exif_photo(taken="    :  :     :  :  "),
    "February 30th": exif_photo(taken="2023:02:30 10:00:00"),
    "a clock never set": exif_photo(taken="1601:01:01 00:00:00"),
}


def _gps_photo(ref_lat, lat, ref_lon, lon) -> bytes:
    ex = Image.Exif()
    ex.get_ifd(IFD.GPSInfo).update({GPS.GPSLatitudeRef: ref_lat, GPS.GPSLatitude: lat,
                                    GPS.GPSLongitudeRef: ref_lon, GPS.GPSLongitude: lon})
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "JPEG", exif=ex)
    return out.getvalue()


R = IFDRational
GARBAGE.update({
    "GPS over a zero denominator": _gps_photo("N", (R(1, 0), R(0), R(0)), "E", (R(3), R(0), R(0))),
    "GPS hemisphere X": _gps_photo("X", (R(10), R(0), R(0)), "E", (R(3), R(0), R(0))),
    "GPS latitude 100": _gps_photo("N", (R(100), R(0), R(0)), "E", (R(3), R(0), R(0))),
    "GPS null island": _gps_photo("N", (R(0), R(0), R(0)), "E", (R(0), R(0), R(0))),
})


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_missing_or_garbage_exif_falls_back(case):
    facts = read_facts(GARBAGE[case])
    assert facts.file_type == "jpeg" and facts.width and facts.height  # the header still says
    assert facts.taken is None and facts.taken_offset_min is None
    assert facts.gps_lat is None and facts.gps_lon is None
    assert facts.orientation in (None, 1, 6)
    out = metadata_columns(facts_table([facts]), ["a/b.jpg"], [1_700_000_000 * 10**9])
    assert out["taken_source"].to_pylist() == ["mtime"]
    assert out["taken"].null_count == 0


def test_a_truncated_block_keeps_what_it_still_holds():
    facts = read_facts(exif_photo(exif=_full_exif()[:-20]))  # the GPS values cut off
    assert (facts.taken, facts.taken_offset_min) == (datetime(2023, 7, 4, 21, 15, 30), 120)
    assert (facts.camera_make, facts.orientation, facts.gps_lat) == ("Canon", 6, None)


def test_wrong_types_are_nulls_not_strings():
    facts = read_facts(GARBAGE["wrong types"])
    assert (facts.orientation, facts.camera_make, facts.camera_model) == (None, None, None)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe1\x00\x10Exif"])
def test_what_is_not_an_image_gives_no_facts(data, tmp_path):
    assert read_facts(data) == ImageFacts()
    assert read_facts(tmp_path / "gone.jpg") == ImageFacts()


def test_flipped_bytes_in_the_exif_block_never_crash():
    """200 copies of a full EXIF block with random bytes changed: each reads to facts."""
    rng = random.Random(14)
    block = bytearray(_full_exif())
    for _ in range(200):
        broken = bytearray(block)
        for _ in range(rng.randint(1, 8)):
            broken[rng.randrange(6, len(broken))] = rng.randrange(256)
        facts = read_facts(exif_photo(exif=bytes(broken)))
        assert facts.file_type == "jpeg"
        metadata_columns(facts_table([facts]), ["x.jpg"], [0])


# ---- real photos (../shared/data, when present) -----------------------------------------------


def _shared_photos() -> list[Path]:
    found = []
    for folder, pattern in (("caltech101-subset", "*/*.jpg"), ("kodak24", "*.png"),
                            ("tiny-coco", "**/*.jpg")):
        found += sorted((SHARED_DATA / folder).glob(pattern))[::25]
    return found


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no ../shared/data in this checkout")
def test_real_photos_read_like_pillow_reads_them():
    """Parity with Pillow's own API on real photos: the displayed size, the format, and the
    EXIF capture time and camera wherever a photo has them (these sets carry little EXIF:
    stripped by their publishers, so the mtime is what most fall back to)."""
    photos = _shared_photos()
    assert len(photos) > 100
    with_time = 0
    for path in photos:
        facts = read_facts(path)
        with Image.open(path) as img:
            exif = img.getexif()
            turned = exif.get(BASE.Orientation) in (5, 6, 7, 8)
            size = img.size[::-1] if turned else img.size
            assert (facts.width, facts.height) == size, path
            assert facts.file_type == img.format.lower().replace("mpo", "jpeg"), path
            original = exif.get_ifd(IFD.Exif).get(BASE.DateTimeOriginal)
            make = exif.get(BASE.Make)
        if original:
            with_time += facts.taken is not None
            assert facts.taken is None or facts.taken.strftime("%Y:%m:%d %H:%M:%S") == (
                str(original).strip("\x00 ")[:19])
        else:
            assert facts.taken is None, path
        if isinstance(make, str) and make.strip("\x00 "):
            assert facts.camera_make == make.strip("\x00 "), path


# ---- at index time --------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder as a camera roll: EXIF photos in trips/2023, a plain PNG at the root."""
    folder = tmp_path / "photos"
    exif_photo(folder / "trips" / "2023" / "beach.jpg", (400, 300), make="Google",
               model="Pixel 7", orientation=6, taken="2023:07:04 21:15:30", offset="-04:00",
               gps=(40.7484, -73.9857), color=(30, 90, 200))
    exif_photo(folder / "trips" / "2023" / "old.jpg", (300, 200), make="NIKON CORPORATION",
               model="NIKON D70", taken="2009:12:24 18:00:00", color=(10, 200, 30))
    Image.new("RGB", (50, 70), (240, 240, 0)).save(folder / "plain.png")
    os.utime(folder / "plain.png", ns=(1_688_472_000 * 10**9,) * 2)  # 2023-07-04 12:00 UTC
    return folder


def _by_path(store: Store) -> dict[str, dict]:
    rows = store.read_table([c for c in store.read_table().column_names
                             if c not in ("embedding", "codes")])
    return {r["path"]: r for r in rows.to_pylist()}


def test_index_writes_the_metadata_columns(tmp_path, photos, embedder, zone):
    zone("UTC")
    store = Store.create(tmp_path / "s.vqret", embedder.spec, photos)
    index_folder(store, embedder, photos)
    rows = _by_path(store)
    beach = rows["trips/2023/beach.jpg"]
    assert beach["taken"] == datetime(2023, 7, 4, 21, 15, 30)
    assert (beach["taken_offset_min"], beach["taken_source"]) == (-240, "exif")
    assert (beach["camera_make"], beach["camera_model"]) == ("Google", "Pixel 7")
    assert (beach["width"], beach["height"], beach["orientation"]) == (300, 400, 6)
    assert beach["gps_lat"] == pytest.approx(40.7484, abs=1e-4)
    assert beach["gps_lon"] == pytest.approx(-73.9857, abs=1e-4)
    assert (beach["folder"], beach["file_type"]) == ("trips/2023", "jpeg")
    old = rows["trips/2023/old.jpg"]
    assert (old["taken"], old["taken_offset_min"]) == (datetime(2009, 12, 24, 18, 0), None)
    plain = rows["plain.png"]
    assert plain["taken"] == datetime(2023, 7, 4, 12, 0)
    assert (plain["taken_source"], plain["taken_offset_min"]) == ("mtime", 0)
    assert (plain["folder"], plain["file_type"], plain["camera_make"]) == ("", "png", None)
    assert (plain["width"], plain["height"]) == (50, 70)
    # the plain Parquet dataset holds them, for pandas, polars and DuckDB users
    part = pq.read_table(store.path / "images" / store.parts()[0])
    assert set(METADATA_COLUMNS) <= set(part.column_names)


def test_big_jpegs_keep_their_full_size_not_the_draft_decode(tmp_path, embedder):
    folder = tmp_path / "big"
    exif_photo(folder / "big.jpg", (2000, 1500), make="Canon")
    store = Store.create(tmp_path / "s.vqret", embedder.spec, folder)
    index_folder(store, embedder, folder)
    row = _by_path(store)["big.jpg"]
    assert (row["width"], row["height"]) == (2000, 1500)


def test_renames_copies_and_touches_keep_the_exif_and_follow_the_file(tmp_path, photos,
                                                                     embedder, zone):
    zone("UTC")
    store = Store.create(tmp_path / "s.vqret", embedder.spec, photos)
    index_folder(store, embedder, photos)
    (photos / "kept").mkdir()
    os.rename(photos / "trips" / "2023" / "beach.jpg", photos / "kept" / "beach.jpg")
    (photos / "copy.jpg").write_bytes((photos / "trips" / "2023" / "old.jpg").read_bytes())
    os.utime(photos / "plain.png", ns=(1_700_000_000 * 10**9,) * 2)  # same bytes, new mtime
    report = index_folder(store, embedder, photos)
    assert (report.renamed, report.embedded) == (1, 0)
    rows = _by_path(store)
    moved = rows["kept/beach.jpg"]
    assert (moved["folder"], moved["camera_model"], moved["taken_source"]) == (
        "kept", "Pixel 7", "exif")
    assert moved["gps_lat"] == pytest.approx(40.7484, abs=1e-4)
    copy = rows["copy.jpg"]
    assert (copy["folder"], copy["taken"], copy["camera_make"]) == (
        "", datetime(2009, 12, 24, 18, 0), "NIKON CORPORATION")
    assert rows["plain.png"]["taken"] == datetime(2023, 11, 14, 22, 13, 20)  # the new mtime


def test_info_counts_each_columns_coverage(tmp_path, photos, embedder):
    store = Store.create(tmp_path / "s.vqret", embedder.spec, photos)
    index_folder(store, embedder, photos)
    coverage = metadata_coverage(store)
    assert coverage == {
        "taken_exif": 2, "taken_exif_offset": 1, "taken_mtime": 1, "camera": 2, "gps": 1,
        "orientation": 1, "file_types": {"jpeg": 2, "png": 1}, "folders": 2, "missing": 0,
    }


# ---- old stores: upgraded without re-embedding -----------------------------------------------


def make_schema_1(store: Store, pieces: int = 1) -> None:
    """Make `store` look as one written before the metadata columns: parts without them (cut
    in `pieces` per part), width and height as the draft decode had them (here: halved), and
    schema version 1 in the manifest."""
    manifest = json.loads((store.path / "manifest.json").read_text())
    parts = []
    for part in store.parts():
        rows = pq.read_table(store.path / "images" / part).drop_columns(list(METADATA_COLUMNS))
        for side in ("width", "height"):
            halved = np.asarray(rows[side].to_numpy(zero_copy_only=False) // 2, np.int32)
            rows = rows.set_column(rows.schema.get_field_index(side), side, [halved])
        (store.path / "images" / part).unlink()
        for k, chunk in enumerate(np.array_split(np.arange(rows.num_rows), pieces)):
            name = f"part-old{k}-{part}"
            pq.write_table(rows.take(chunk), store.path / "images" / name)
            parts.append(name)
    manifest["tables"]["images"]["parts"] = parts
    manifest["schema_version"] = 1
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    store.refresh()


class NoModel:
    """An embedder that must not embed: an upgrade re-embeds nothing."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.spec = embedder.spec

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def iter_image_files(self, paths, num_workers=None):
        raise AssertionError(f"re-embedded {len(paths)} images")


def _vectors(store: Store) -> dict[int, bytes]:
    ids, vectors = store.vectors()
    return {int(i): v.tobytes() for i, v in zip(ids, vectors, strict=True)}


def test_an_old_store_gets_the_columns_without_reembedding(tmp_path, photos, embedder):
    make_shape_folder(photos / "shapes", 6, seed=14)
    store = Store.create(tmp_path / "s.vqret", embedder.spec, photos)
    index_folder(store, embedder, photos)
    fresh = _by_path(store)
    make_schema_1(store, pieces=3)
    before = _vectors(store)
    # an old store reads as one with null metadata, before anything is upgraded
    old = Store(store.path)
    assert old.schema_version == 1
    assert old.read_table(["taken_source"])["taken_source"].null_count == len(before)
    assert metadata_coverage(old)["missing"] == len(before)

    report = index_folder(store, NoModel(embedder), photos)
    assert report.upgraded == len(before)
    assert (report.embedded, report.added, report.updated, report.removed) == (0, 0, 0, 0)
    assert store.schema_version == SCHEMA_VERSION
    assert _vectors(store) == before  # ids and embedding bytes as they were
    rows = _by_path(store)
    for path, row in fresh.items():  # every column as a fresh index has it
        for name in (*METADATA_COLUMNS, "width", "height"):
            assert rows[path][name] == row[name], (path, name)
    # the next run has nothing to upgrade
    assert index_folder(store, NoModel(embedder), photos).upgraded == 0


def test_an_upgrade_killed_halfway_keeps_the_parts_done(tmp_path, photos, embedder, monkeypatch):
    make_shape_folder(photos / "shapes", 6, seed=15)
    store = Store.create(tmp_path / "s.vqret", embedder.spec, photos)
    index_folder(store, embedder, photos)
    make_schema_1(store, pieces=3)
    before = _vectors(store)
    real = StoreWriter.set_part_columns
    calls = []

    def dies_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between two commits
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "set_part_columns", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        index_folder(store, NoModel(embedder), photos)
    monkeypatch.undo()
    half = Store(store.path)  # readable, still schema 1, the first part done
    assert half.schema_version == 1
    done = len(before) - half.read_table(["taken_source"])["taken_source"].null_count
    assert 0 < done < len(before)
    report = index_folder(half, NoModel(embedder), photos)
    assert report.upgraded == len(before) - done
    assert half.schema_version == SCHEMA_VERSION
    assert _vectors(half) == before


def test_an_upgrade_falls_back_to_the_row_where_a_file_says_nothing(tmp_path, photos,
                                                                    embedder, zone):
    zone("UTC")
    store = Store.create(tmp_path / "s.vqret", embedder.spec, photos)
    index_folder(store, embedder, photos)
    stored = _by_path(store)
    make_schema_1(store)

    def unreadable(names):  # e.g. a share that is offline: no header can be read
        return ((i, ImageFacts()) for i in range(len(names)))

    report = index_folder(store, NoModel(embedder), photos, facts_reader=unreadable)
    assert report.upgraded == 3
    rows = _by_path(store)
    beach = rows["trips/2023/beach.jpg"]
    assert (beach["taken_source"], beach["camera_make"], beach["file_type"]) == (
        "mtime", None, "jpeg")
    mtime_us = stored["trips/2023/beach.jpg"]["mtime_ns"] // 1000
    assert beach["taken"] == datetime(1970, 1, 1) + timedelta(microseconds=mtime_us)  # UTC
    assert (beach["width"], beach["height"]) == (150, 200)  # as the old row had them
    assert beach["folder"] == "trips/2023"


def test_a_url_source_has_folders_relative_to_its_root(tmp_path, photos, embedder):
    """Rows of a remote source keep their full URL as path; the folder is still relative to
    the indexed root, and an upgrade reads each header through fsspec."""
    url = f"file://{photos}"
    store = Store.create(tmp_path / "s.vqret", embedder.spec, url)
    index_folder(store, embedder, url)
    rows = _by_path(store)
    beach = rows[f"{url}/trips/2023/beach.jpg"]
    assert (beach["folder"], beach["camera_model"]) == ("trips/2023", "Pixel 7")
    assert rows[f"{url}/plain.png"]["folder"] == ""
    make_schema_1(store)
    assert index_folder(store, NoModel(embedder), url).upgraded == 3
    assert _by_path(store)[f"{url}/trips/2023/beach.jpg"]["camera_model"] == "Pixel 7"
