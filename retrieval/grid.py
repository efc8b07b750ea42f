"""Search results as one picture: a grid of thumbnails, each labelled with rank and score."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write
from .images import ImageLoadError, load_image

LABEL_HEIGHT = 22


def _placeholder(size: int, text: str) -> Image.Image:
    tile = Image.new("RGB", (size, size), (235, 235, 235))
    ImageDraw.Draw(tile).text((8, size // 2 - 6), text, fill=(120, 120, 120))
    return tile


def _thumbnail(path: Path | Image.Image, size: int) -> Image.Image:
    if isinstance(path, Image.Image):  # already decoded: a video's frame
        image = path.convert("RGB")
    else:
        try:
            image = load_image(path, draft_size=(size, size))
        except ImageLoadError:
            return _placeholder(size, "unreadable")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (size, size), (255, 255, 255))
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def render_grid(
    items: Sequence[tuple[Path | Image.Image, str]],
    out: Path,
    *,
    thumb: int = 192,
    columns: int | None = None,
    title: str | None = None,
) -> Path:
    """Write `items` (image path or decoded picture, label) as a PNG/JPEG grid at `out`;
    returns `out`."""
    if not items:
        raise ValueError("nothing to draw: no results")
    columns = columns or min(len(items), max(1, math.ceil(math.sqrt(len(items)))) + 1)
    columns = min(columns, len(items))
    rows = math.ceil(len(items) / columns)
    pad = 6
    head = LABEL_HEIGHT if title else 0
    cell_h = thumb + LABEL_HEIGHT
    canvas = Image.new(
        "RGB",
        (columns * (thumb + pad) + pad, head + rows * (cell_h + pad) + pad),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((pad, 4), title, fill=(0, 0, 0), font=font)
    for n, (path, label) in enumerate(items):
        x = pad + (n % columns) * (thumb + pad)
        y = head + pad + (n // columns) * (cell_h + pad)
        canvas.paste(_thumbnail(path, thumb), (x, y))
        draw.text((x + 2, y + thumb + 4), label, fill=(0, 0, 0), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = "JPEG" if out.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    atomic_write(out, lambda tmp: canvas.save(tmp, format=kind))
    return out
