"""Search results as one picture: a grid of cells, each image scaled to fill its cell, with
its file name (shortened to fit) and its rank and score under it.

The layout is chosen for the number of results: about 4 columns to 3 rows, cells as large
as fit a 1920-pixel-wide picture (at most 320, at least 96 pixels), so one result is one
large picture and a hundred stay readable. Every image is scaled to the cell, up or down,
keeping its shape: a 32-pixel CIFAR image fills a 320-pixel cell as a 4000-pixel photo does
(before, images smaller than a cell were drawn at their own size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write
from .images import ImageLoadError, load_image

MAX_WIDTH = 1920  # the whole picture, at most (a screen's width)
MAX_CELL = 320
MIN_CELL = 96
PAD = 6
FONT_SIZE = 13
LINE = FONT_SIZE + 4
LABEL_HEIGHT = 2 * LINE + 4  # file name, then rank and score
ELLIPSIS = "…"

GridItem = (tuple[Path | str | Image.Image, str]
            | tuple[Path | str | Image.Image, str, str])  # a video's frame comes decoded


def grid_layout(n: int) -> tuple[int, int, int]:
    """(columns, rows, cell side in pixels) for `n` results."""
    if n < 1:
        raise ValueError("nothing to draw: no results")
    columns = min(n, max(1, math.ceil(math.sqrt(n * 4 / 3))))
    rows = math.ceil(n / columns)
    cell = max(MIN_CELL, min(MAX_CELL, (MAX_WIDTH - PAD) // columns - PAD))
    return columns, rows, cell


def fit_text(text: str, width: float, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """`text` shortened in the middle, as many characters kept at its start as at its end
    (the extension, a frame number), until it is at most `width` pixels wide in `font`."""
    if font.getlength(text) <= width:
        return text
    for keep in range(len(text) - 1, 0, -1):
        head = (keep + 1) // 2
        short = text[:head] + ELLIPSIS + text[len(text) - (keep - head):]
        if font.getlength(short) <= width:
            return short
    return ELLIPSIS if font.getlength(ELLIPSIS) <= width else ""


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)  # a scalable font where FreeType is there
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _placeholder(size: int, text: str) -> Image.Image:
    tile = Image.new("RGB", (size, size), (235, 235, 235))
    ImageDraw.Draw(tile).text((8, size // 2 - 6), text, fill=(120, 120, 120), font=_font())
    return tile


def fill_cell(image: Image.Image, size: int) -> Image.Image:
    """`image` scaled, keeping its shape, until its longer side is `size`, centred on a white
    `size` x `size` tile."""
    scale = size / max(image.width, image.height)
    width = max(1, min(size, round(image.width * scale)))
    height = max(1, min(size, round(image.height * scale)))
    # Lanczos when shrinking; bicubic when enlarging (Lanczos rings around a small image's
    # hard edges)
    method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    scaled = image.resize((width, height), method, reducing_gap=3.0 if scale < 1 else None)
    tile = Image.new("RGB", (size, size), (255, 255, 255))
    tile.paste(scaled, ((size - width) // 2, (size - height) // 2))
    return tile


def _cell_image(path: Path | str | Image.Image, size: int) -> Image.Image:
    if isinstance(path, Image.Image):  # already decoded: a video's frame
        return fill_cell(path.convert("RGB"), size)
    try:
        image = load_image(path, draft_size=(size, size))
    except ImageLoadError:
        return _placeholder(size, "unreadable")
    return fill_cell(image, size)


def _name_of(path: Path | str) -> str:
    name = PurePosixPath(str(path).replace("\\", "/")).name
    return name or str(path)


def render_grid(
    items: Sequence[GridItem],
    out: Path,
    *,
    columns: int | None = None,
    title: str | None = None,
) -> Path:
    """Write `items` as a PNG/JPEG grid at `out`; returns `out`.

    Each item is (image path, label) or (image path, label, name): the cell shows the image,
    then `name` (default: the path's file name) shortened to the cell's width, then `label`
    (e.g. "#1  0.873")."""
    if not items:
        raise ValueError("nothing to draw: no results")
    auto_columns, _, cell = grid_layout(len(items))
    columns = min(columns or auto_columns, len(items))
    rows = math.ceil(len(items) / columns)
    font = _font()
    head = LINE + PAD if title else 0
    cell_h = cell + LABEL_HEIGHT
    width = columns * (cell + PAD) + PAD
    canvas = Image.new("RGB", (width, head + rows * (cell_h + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD // 2 + 2), fit_text(title, width - 2 * PAD, font), fill=(0, 0, 0),
                  font=font)
    for n, item in enumerate(items):
        path, label = item[0], item[1]
        name = item[2] if len(item) > 2 else _name_of(path)
        x = PAD + (n % columns) * (cell + PAD)
        y = head + PAD + (n // columns) * (cell_h + PAD)
        canvas.paste(_cell_image(path, cell), (x, y))
        draw.text((x + 2, y + cell + 3), fit_text(name, cell - 4, font), fill=(0, 0, 0),
                  font=font)
        draw.text((x + 2, y + cell + 3 + LINE), fit_text(label, cell - 4, font),
                  fill=(90, 90, 90), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = "JPEG" if out.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    atomic_write(out, lambda tmp: canvas.save(tmp, format=kind))
    return out
