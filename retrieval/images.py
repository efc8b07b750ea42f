"""Load images "in the wild" into plain RGB PIL images.

This module runs in decode worker processes, so it must stay cheap to import: no torch, and
numpy / pillow-heif are only imported when a file actually needs them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .content_hash import unreadable
from .one_line import first_line
from .urls import is_url

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "DecodeGate",
    "ImageLoadError",
    "image_size",
    "load_image",
]

_HAS_HEIF = importlib.util.find_spec("pillow_heif") is not None
# Pillow >= 11.2 decodes AVIF itself when built with libavif; older pillow-heif releases did too.
_HAS_AVIF = _HAS_HEIF or importlib.util.find_spec("PIL._avif") is not None

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    [".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"]
    + ([".heic", ".heif"] if _HAS_HEIF else [])
    + ([".avif"] if _HAS_AVIF else [])
)

# Just under PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS = 178,956,970), so that with the
# default our check, which reports the dimensions, is the one that fires. ~150 MP is a 15000 x
# 10000 panorama: about 450 MB as RGB, already a lot per decode worker.
MAX_PIXELS = 150_000_000

# We check max_pixels ourselves on every load, so PIL's per-file warning for images above
# Image.MAX_IMAGE_PIXELS (~89 MP) is only noise; its hard DecompressionBombError is still mapped.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_ORIENTATION = ExifTags.Base.Orientation
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_MAX_DETAIL = 120
# Modes Image.reduce takes as they are; "1" and palettes are converted first (to L / RGB(A)),
# 16-bit ones are left whole: their 8-bit scaling must see the full range.
_REDUCIBLE = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F")

# gate(pixels) -> a context manager held while that many pixels are decoded (see load_image)
DecodeGate = Callable[[int], contextlib.AbstractContextManager[Any]]


class ImageLoadError(Exception):
    """An image could not be loaded; `str()` is one line: "<path>: <cause>"."""

    def __init__(self, path: str, cause: str) -> None:
        # Both go to Exception.__init__ so the error pickles across worker processes.
        super().__init__(path, cause)
        self.path = path
        self.cause = cause

    def __str__(self) -> str:
        # Undecodable (surrogateescape) names would make printing the message itself crash.
        path = self.path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return _one_line(f"{path}: {self.cause}")


def load_image(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    max_pixels: int | None = MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    reduce_size: tuple[int, int] | None = None,
    gate: DecodeGate | None = None,
) -> Image.Image:
    """Decode `source` fully into an RGB image.

    The first frame of animations is used, EXIF orientation is applied, transparency is
    composited over white and 16-bit data is scaled down to 8 bits. `draft_size` lets JPEGs
    decode at 1/2, 1/4 or 1/8 scale while staying at least that large on both sides (in the
    displayed orientation). `reduce_size` shrinks any other image by a whole factor
    (`Image.reduce`, a box filter) right after decoding, while staying at least that large on
    both sides, so that the conversions after it (to RGB, compositing) work on few pixels.
    `gate(pixels)`, when given, is entered with the number of pixels about to be decoded
    (after the draft) and held until the image is reduced and converted: a server's budget of
    memory in flight; whatever it raises propagates as it is. A stream must be seekable and
    positioned at the image's start. Any failure to decode raises ImageLoadError.
    """
    name = _source_name(source)
    fp = _open_source(source, name)
    try:
        img = _open_image(fp, name, max_pixels)
        with _decode_errors(name, img):
            img.seek(0)  # animations: the first frame is the representative one
            if draft_size is not None and img.format in ("JPEG", "MPO"):
                _apply_draft(img, draft_size)
        width, height = img.size
        with gate(width * height) if gate is not None else contextlib.nullcontext():
            with _decode_errors(name, img):
                img.load()  # decode now, so truncated or corrupt data fails here
                if reduce_size is not None:
                    img = _reduce(img, reduce_size)
                return _to_rgb(_exif_transpose(img), name)
    finally:
        if fp is not source:
            fp.close()


@contextlib.contextmanager
def _decode_errors(name: str, img: Image.Image) -> Iterator[None]:
    """Whatever a decoder raises, as one ImageLoadError."""
    try:
        yield
    except ImageLoadError:
        raise
    except MemoryError as err:
        raise ImageLoadError(name, "out of memory while decoding") from err
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, ...
        raise _decode_error(name, img.format, err) from err


def image_size(source: str | os.PathLike[str] | bytes | BinaryIO) -> tuple[int, int]:
    """(width, height) from the header alone, after EXIF orientation: the size load_image
    returns without `draft_size` (except for the rare PNG storing EXIF after its pixels).
    Nothing is decoded and no pixel limit is applied."""
    name = _source_name(source)
    fp = _open_source(source, name)
    try:
        img = _open_image(fp, name, None)
        width, height = img.size
        if _orientation(img) in _TRANSPOSED_ORIENTATIONS:
            return height, width
        return width, height
    finally:
        if fp is not source:
            fp.close()


@functools.cache
def _register_heif() -> None:
    if not _HAS_HEIF:
        return
    import pillow_heif

    pillow_heif.register_heif_opener()
    if importlib.util.find_spec("PIL._avif") is None and hasattr(
        pillow_heif, "register_avif_opener"
    ):
        pillow_heif.register_avif_opener()  # pillow-heif < 1.0 only


def _open_url(url: str, name: str) -> BinaryIO:
    from .remote import open_url  # fsspec, imported only when a URL is opened

    try:
        return open_url(url)
    except Exception as err:  # noqa: BLE001 - FileNotFoundError, botocore's, a missing s3fs...
        raise ImageLoadError(name, f"unreadable ({_first_line(err)})") from err


def _source_name(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    name = getattr(source, "name", None)
    return os.fsdecode(name) if isinstance(name, (str, bytes)) else "<stream>"


def _open_source(source: object, name: str) -> BinaryIO:
    """A binary file object for `source`; the caller closes it unless it is `source` itself."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and is_url(source):
            return _open_url(source, name)
        try:
            return open(source, "rb")
        except OSError as err:
            raise ImageLoadError(name, unreadable(err)) from err
    return source  # type: ignore[return-value]


def _open_image(fp: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before anything is decoded."""
    _register_heif()
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as err:
        # PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS) fired first, inside Image.open.
        numbers = re.findall(r"\d+", str(err))
        detail = f"{numbers[0]} > {numbers[1]}" if len(numbers) == 2 else _first_line(err)
        raise ImageLoadError(name, f"too many pixels ({detail})") from err
    except UnidentifiedImageError as err:
        cause = "empty file (0 bytes)" if _is_empty(fp) else "not an image or unknown format"
        raise ImageLoadError(name, cause) from err
    except OSError as err:
        if err.errno is not None:  # a real I/O error, not a PIL parsing one
            raise ImageLoadError(name, unreadable(err)) from err
        raise _decode_error(name, None, err) from err
    except Exception as err:  # some plugins fail header parsing with other exception types
        raise _decode_error(name, None, err) from err

    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(name, f"too many pixels ({width} x {height} > {max_pixels})")
    return img


def _is_empty(fp: BinaryIO) -> bool:
    try:
        return fp.seek(0, io.SEEK_END) == 0
    except (OSError, ValueError, AttributeError):
        return False


def _orientation(img: Image.Image) -> int | None:
    if img.format == "PNG" and "exif" not in img.info:
        # An eXIf chunk after the pixel data: PIL would decode the whole image to reach it.
        return None
    try:
        return img.getexif().get(_ORIENTATION)
    except Exception:  # broken EXIF blocks are common in the wild and must not block loading
        return None


def _apply_draft(img: Image.Image, draft_size: tuple[int, int]) -> None:
    want_w, want_h = draft_size
    if _orientation(img) in _TRANSPOSED_ORIENTATIONS:
        want_w, want_h = want_h, want_w  # draft_size is meant for the displayed orientation
    width, height = img.size
    # PIL picks the largest scale that keeps both sides >= the request; guard the degenerate case.
    if want_w > 0 and want_h > 0 and width >= 2 * want_w and height >= 2 * want_h:
        img.draft("RGB", (want_w, want_h))


def _reduce(img: Image.Image, reduce_size: tuple[int, int]) -> Image.Image:
    """`img` shrunk by the largest whole factor that keeps both sides >= reduce_size."""
    want_w, want_h = reduce_size
    if _orientation(img) in _TRANSPOSED_ORIENTATIONS:
        want_w, want_h = want_h, want_w  # reduce_size is meant for the displayed orientation
    width, height = img.size
    factor = min(width // max(want_w, 1), height // max(want_h, 1))
    if factor < 2:
        return img
    if img.mode == "1":
        img = img.convert("L")  # a 1-bit drawing averaged into grey keeps its thin lines
    elif img.mode in ("P", "PA"):
        alpha = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if alpha else "RGB")
    if img.mode not in _REDUCIBLE:
        return img
    info = img.info
    reduced = img.reduce(factor)
    reduced.info = info  # keep the EXIF orientation (and the rest) for what follows
    return reduced


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # a broken EXIF block: keep the pixels as stored rather than fail
        pass
    return img


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as err:  # e.g. LAB, which Image.convert cannot map to RGB
        raise ImageLoadError(name, f"unsupported image mode {img.mode}") from err


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images into 0..255 instead of clipping them."""
    import numpy as np  # lazy: only a few files need it

    data = np.asarray(img)
    if img.mode.startswith("I;16"):
        top = 65535.0  # the format's full range: a dark 16-bit image must stay dark
    else:
        # 32-bit int and float images carry no declared range: infer the common ones.
        low, top = float(data.min()), float(data.max())
        if low < 0:
            data, top = data - low, top - low
        if img.mode == "F" and top <= 1.0:
            top = 1.0
        elif top <= 255:
            top = 255.0
        elif top <= 65535:
            top = 65535.0
    scaled = np.nan_to_num(data.astype(np.float32) * np.float32(255.0 / top))
    scaled = np.clip(scaled, 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled)


def _decode_error(name: str, fmt: str | None, err: BaseException) -> ImageLoadError:
    what = f"corrupt {fmt}" if fmt else "corrupt image"
    detail = _first_line(err)
    cause = f"truncated or {what}" + (f" ({detail})" if detail else "")
    return ImageLoadError(name, cause)


def _first_line(err: BaseException) -> str:
    detail = first_line(err)
    return detail if len(detail) <= _MAX_DETAIL else detail[: _MAX_DETAIL - 3] + "..."


def _one_line(text: str) -> str:
    return re.sub(r"[\r\n]+", " ", text)
