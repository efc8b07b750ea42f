"""`--grid`: every image scaled to fill its cell (a 32-pixel one and a 4000-pixel one alike),
its file name and score under it, a layout that stays readable from 1 to 100 results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vqret.retrieval.grid import (
    LABEL_HEIGHT,
    MAX_WIDTH,
    MIN_CELL,
    PAD,
    _font,
    fit_text,
    grid_layout,
    render_grid,
)

RED, BLUE = (220, 20, 20), (20, 20, 220)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("grid")
    tiny = folder / "cifar_32px.png"
    Image.new("RGB", (32, 32), RED).save(tiny)
    big = folder / "a_very_long_holiday_photo_name_from_the_camera_0001.jpg"
    Image.new("RGB", (4000, 3000), BLUE).save(big, quality=95)
    return {"tiny": tiny, "big": big}


def _cell(picture: np.ndarray, n: int, columns: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """(image area, label area) of cell n (no title)."""
    x = PAD + (n % columns) * (cell + PAD)
    y = PAD + (n // columns) * (cell + LABEL_HEIGHT + PAD)
    return picture[y : y + cell, x : x + cell], picture[y + cell : y + cell + LABEL_HEIGHT,
                                                       x : x + cell]


def _near(area: np.ndarray, color: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    return (np.abs(area.astype(int) - color) <= tol).all(axis=-1)


def test_images_fill_their_cells_and_are_labelled(images, tmp_path: Path) -> None:
    out = render_grid([(images["tiny"], "#1  0.912"), (images["big"], "#2  0.873")],
                      tmp_path / "grid.png")
    picture = np.asarray(Image.open(out).convert("RGB"))
    columns, rows, cell = grid_layout(2)
    assert (columns, rows) == (2, 1) and cell > 200
    assert picture.shape[:2] == (PAD + rows * (cell + LABEL_HEIGHT + PAD),
                                 PAD + columns * (cell + PAD))
    tiny, tiny_label = _cell(picture, 0, columns, cell)
    # the 32 px image is enlarged to the whole cell, not drawn at 32 px in a corner
    assert _near(tiny, RED).mean() > 0.99
    big, big_label = _cell(picture, 1, columns, cell)
    # the 4000 x 3000 photo is shrunk to the cell's width, its shape kept (3:4 of the height)
    blue = _near(big, BLUE)
    assert blue[cell // 2].all(), "the full width is the photo"
    filled_rows = blue.any(axis=1).sum()
    assert abs(filled_rows - round(cell * 3 / 4)) <= 2
    assert not blue[:5].any() and not blue[-5:].any(), "white bands above and below"
    # under each image: two lines of text (the file name, then rank and score)
    for label in (tiny_label, big_label):
        dark = (label.astype(int).sum(axis=-1) < 450).any(axis=1)
        lines = np.flatnonzero(dark)
        assert len(lines) and lines.max() - lines.min() > 14, "two lines of text"


def test_file_names_are_shortened_to_the_cell() -> None:
    font = _font()
    name = "a_very_long_holiday_photo_name_from_the_camera_0001.jpg"
    short = fit_text(name, 150, font)
    assert font.getlength(short) <= 150 and short != name
    assert short.endswith("0001.jpg") and short.startswith("a_very") and "…" in short
    assert fit_text("cat.jpg", 150, font) == "cat.jpg"
    assert font.getlength(fit_text(name, 20, font)) <= 20


def test_the_layout_stays_readable_from_1_to_100_results(images, tmp_path: Path) -> None:
    previous_cell = None
    for n in range(1, 101):
        columns, rows, cell = grid_layout(n)
        assert columns * rows >= n > columns * (rows - 1), n  # no empty row
        assert rows <= columns + 1, n  # wider than tall, about 4:3
        assert MIN_CELL <= cell and columns * (cell + PAD) + PAD <= MAX_WIDTH, n
        assert previous_cell is None or cell <= previous_cell  # more results, smaller cells
        previous_cell = cell
    out = render_grid([(images["tiny"], f"#{i}  0.5") for i in range(1, 101)],
                      tmp_path / "hundred.jpg", title="a red square")
    picture = Image.open(out)
    columns, rows, cell = grid_layout(100)
    assert picture.width == PAD + columns * (cell + PAD) <= MAX_WIDTH
    assert cell >= MIN_CELL
    with pytest.raises(ValueError, match="no results"):
        render_grid([], tmp_path / "none.png")


def test_an_unreadable_file_gets_a_placeholder(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = render_grid([(broken, "#1  0.1")], tmp_path / "one.png")
    columns, rows, cell = grid_layout(1)
    picture = np.asarray(Image.open(out).convert("RGB"))
    area, _ = _cell(picture, 0, columns, cell)
    assert _near(area, (235, 235, 235), 2).mean() > 0.9
