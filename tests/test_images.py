import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from vqret.retrieval.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageLoadError,
    image_size,
    load_image,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _close(actual, expected, tol=12):
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _noise_jpeg(path: Path, size=(256, 256), **save_args) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90, **save_args)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but whose pixel data is a few junk bytes:
    any attempt to decode it fails, so a 'too many pixels' error proves nothing was decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def _split_colours(size, left, right, mode="RGB"):
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


# --- errors -----------------------------------------------------------------------------------


def test_truncated_jpeg_is_reported_as_truncated(tmp_path):
    good = _noise_jpeg(tmp_path / "good.jpg")
    cut = tmp_path / "photo.jpg"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])

    assert load_image(good).size == (256, 256)
    with pytest.raises(ImageLoadError) as info:
        load_image(cut)
    message = str(info.value)
    assert "truncat" in message or "corrupt" in message
    assert "JPEG" in message
    assert message.startswith(str(cut) + ": ")
    assert "\n" not in message and "Traceback" not in message
    assert info.value.path == str(cut)


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty file \(0 bytes\)"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(b"")


def test_text_file_named_jpg(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("these are not pixels\n" * 20)
    with pytest.raises(ImageLoadError, match="not an image") as info:
        load_image(fake)
    assert "empty" not in info.value.cause


def test_missing_file_and_folder_are_unreadable(tmp_path):
    with pytest.raises(ImageLoadError, match=r"unreadable \(No such file or directory\)"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="unreadable"):
        load_image(tmp_path)


def test_corrupt_png_data(tmp_path):
    path = tmp_path / "bad.png"
    _split_colours((64, 64), RED, BLUE).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 20] = b"\xff" * 20  # garbage in the zlib stream
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(path)


def test_error_pickles_for_worker_processes():
    err = ImageLoadError("a/b.jpg", "empty file (0 bytes)")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.path, clone.cause) == ("a/b.jpg", "empty file (0 bytes)")
    assert str(clone) == "a/b.jpg: empty file (0 bytes)"


def test_error_message_survives_undecodable_names():
    err = ImageLoadError("bad\udcff.jpg", "empty file (0 bytes)")
    text = str(err)
    text.encode("utf-8")  # must not raise
    assert text == "bad\\xff.jpg: empty file (0 bytes)"


# --- pixel limit ------------------------------------------------------------------------------


def test_too_many_pixels_rejected_before_decoding(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 5000, 5000)
    with pytest.raises(ImageLoadError, match=r"too many pixels \(5000 x 5000 > 10000000\)"):
        load_image(path, max_pixels=10_000_000)
    # Without the limit the same file reaches the decoder, which fails differently: so the
    # rejection above really happened before decoding.
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(path, max_pixels=None)
    assert image_size(path) == (5000, 5000)


def test_huge_header_rejected_with_default_limit(tmp_path):
    path = _png_header_only(tmp_path / "huge.png", 30000, 30000)
    assert 30000 * 30000 > MAX_PIXELS
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(path)


# --- modes and colours ------------------------------------------------------------------------


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    _split_colours((64, 32), (0, 255, 255, 0), (255, 255, 0, 0), mode="CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB"
    assert _close(img.getpixel((8, 16)), RED)
    assert _close(img.getpixel((56, 16)), BLUE)


def test_16bit_png_keeps_its_gradient(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(np.tile(ramp, (8, 1))).save(path)
    assert Image.open(path).mode.startswith("I")

    img = load_image(path)
    assert img.mode == "RGB"
    row = np.asarray(img)[4, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254
    assert abs(row[128] - 128) <= 2
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 200


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.tile(np.linspace(0, 1, 64, dtype=np.float32), (4, 1))).save(path)
    row = np.asarray(load_image(path))[0, :, 1].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 100 < row[32] < 156


def test_palette_png_transparency_becomes_white(tmp_path):
    img = Image.new("P", (64, 32), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.paste(1, (32, 0, 64, 32))
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)  # the red index is fully transparent

    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((50, 5)) == BLUE


def test_rgba_composited_over_white(tmp_path):
    img = Image.new("RGBA", (30, 10), (0, 255, 0, 0))  # invisible green
    img.paste((255, 0, 0, 255), (10, 0, 20, 10))
    img.paste((0, 0, 0, 128), (20, 0, 30, 10))
    path = tmp_path / "alpha.png"
    img.save(path)

    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((15, 5)) == RED
    assert _close(out.getpixel((25, 5)), (127, 127, 127), tol=2)


def test_la_composited_over_white(tmp_path):
    img = Image.new("LA", (20, 10), (0, 0))
    img.paste((0, 255), (10, 0, 20, 10))
    path = tmp_path / "la.png"
    img.save(path)
    out = load_image(path)
    assert out.getpixel((5, 5)) == WHITE and out.getpixel((15, 5)) == (0, 0, 0)


def test_greyscale_and_bilevel_become_rgb(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.png")
    grey = load_image(tmp_path / "grey.png")
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)
    assert load_image(tmp_path / "bw.png").getpixel((0, 0)) == WHITE


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in (GREEN, RED, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3

    img = load_image(path)
    assert img.mode == "RGB"
    assert _close(img.getpixel((8, 8)), GREEN, tol=4)


def test_animated_png_gives_first_frame(tmp_path):
    frames = [Image.new("RGBA", (16, 16), c + (255,)) for c in (BLUE, RED)]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert getattr(Image.open(path), "n_frames", 1) == 2
    assert load_image(path).getpixel((8, 8)) == BLUE


# --- orientation and draft --------------------------------------------------------------------


def _oriented_jpeg(path: Path, size, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    _split_colours(size, RED, BLUE).save(path, quality=95, exif=exif)  # left red, right blue
    return path


def test_exif_orientation_is_applied(tmp_path):
    path = _oriented_jpeg(tmp_path / "rot.jpg", (40, 20), orientation=6)
    img = load_image(path)
    assert img.size == (20, 40)
    assert image_size(path) == (20, 40)
    # Orientation 6 = rotate 90 degrees clockwise to display: the stored left half ends on top.
    assert _close(img.getpixel((10, 5)), RED, tol=30)
    assert _close(img.getpixel((10, 35)), BLUE, tol=30)


def test_image_size_decodes_nothing(tmp_path, monkeypatch):
    Image.new("RGB", (30, 20), RED).save(tmp_path / "a.png")
    _oriented_jpeg(tmp_path / "b.jpg", (30, 20), orientation=8)
    decoded = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        decoded.append(self.format)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    assert image_size(tmp_path / "a.png") == (30, 20)
    assert image_size(tmp_path / "b.jpg") == (20, 30)
    assert decoded == []


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_broken_exif_does_not_block_loading(tmp_path, monkeypatch):
    path = tmp_path / "badexif.jpg"
    Image.new("RGB", (16, 8), RED).save(path, exif=b"Exif\x00\x00MM\x00*garbage")
    assert load_image(path).size == (16, 8)

    # EXIF parsers fail in many ways on files in the wild; none of them may stop loading.
    def explode(*args, **kwargs):
        raise SyntaxError("bad EXIF")

    rotated = _oriented_jpeg(tmp_path / "rot.jpg", (400, 200), orientation=6)
    monkeypatch.setattr(ImageOps, "exif_transpose", explode)
    monkeypatch.setattr(Image.Image, "getexif", explode)
    assert load_image(rotated, draft_size=(50, 50)).size == (100, 50)  # stored orientation
    assert image_size(rotated) == (400, 200)


def test_draft_mode_decodes_big_jpeg_smaller(tmp_path):
    path = _noise_jpeg(tmp_path / "big.jpg", size=(2000, 1500))
    full = load_image(path)
    assert full.size == (2000, 1500)

    small = load_image(path, draft_size=(224, 224))
    assert small.mode == "RGB"
    assert small.width >= 224 and small.height >= 224
    assert small.width < 2000 and small.height < 1500
    # A request that 1/2 scale cannot satisfy leaves the image at full size.
    assert load_image(path, draft_size=(1001, 800)).size == (2000, 1500)


def test_draft_size_refers_to_the_displayed_orientation(tmp_path):
    # Stored 2000x1000, displayed 1000x2000. Without swapping the request into stored
    # orientation, PIL would halve the image and the displayed width would drop to 500.
    path = _oriented_jpeg(tmp_path / "tall.jpg", (2000, 1000), orientation=6)
    img = load_image(path, draft_size=(800, 400))
    assert img.width >= 800 and img.height >= 400
    # Swapped into stored orientation, a small request still gets the full 1/4 reduction.
    assert load_image(path, draft_size=(200, 400)).size == (250, 500)


def test_draft_is_ignored_for_non_jpeg(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (800, 800), RED).save(path)
    assert load_image(path, draft_size=(100, 100)).size == (800, 800)


# --- sources and formats ----------------------------------------------------------------------


def test_bytes_and_stream_sources(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (7, 5), BLUE).save(path)
    data = path.read_bytes()
    assert load_image(data).getpixel((0, 0)) == BLUE
    with open(path, "rb") as stream:
        assert load_image(stream).size == (7, 5)
        assert not stream.closed  # a caller's stream is the caller's to close
    with pytest.raises(ImageLoadError) as info:
        load_image(io.BytesIO(b"nope"))
    assert info.value.path == "<stream>"


def test_image_extensions():
    assert {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= (
        IMAGE_EXTENSIONS
    )
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    assert ".txt" not in IMAGE_EXTENSIONS


def test_heic_loads_when_pillow_heif_is_installed(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    assert {".heic", ".heif"} <= IMAGE_EXTENSIONS
    path = tmp_path / "phone.heic"
    pillow_heif.from_pillow(_split_colours((64, 64), RED, BLUE)).save(path, quality=95)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert _close(img.getpixel((8, 32)), RED, tol=30)
