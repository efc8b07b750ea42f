"""Caption sets in the formats people have: COCO caption JSON, Karpathy splits, CSV/JSONL.

Every reader returns a `CaptionSet`: the image files (relative paths) and, for each caption,
the position of its image, which is what recall@k needs.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path


class CaptionFormatError(ValueError):
    pass


@dataclass
class CaptionSet:
    images: list[str] = field(default_factory=list)  # paths relative to the image folder
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)  # position in `images` per caption

    def add(self, image: str, captions: list[str]) -> None:
        position = len(self.images)
        self.images.append(image)
        for text in captions:
            self.captions.append(text)
            self.caption_image.append(position)


def read_captions(path: Path | str, split: str | None = None) -> CaptionSet:
    """Read a caption file, its format told by its content (and extension for CSV/JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionFormatError(f"{path}: caption file not found")
    if path.suffix.lower() == ".csv":
        return _read_rows(path, _csv_rows(path))
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_rows(path, _jsonl_rows(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionFormatError(f"{path}: not readable JSON ({e})") from e
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return _read_coco(path, data)
    if isinstance(data, dict) and data.get("images") and "sentences" in data["images"][0]:
        return _read_karpathy(path, data, split)
    raise CaptionFormatError(
        f"{path}: not COCO caption JSON (images + annotations), a Karpathy dataset_*.json "
        "(images with sentences), nor a .csv/.jsonl of image,caption rows"
    )


def _read_coco(path: Path, data: dict) -> CaptionSet:
    by_image: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    out = CaptionSet()
    for image in sorted(data["images"], key=lambda im: im["id"]):
        if image["id"] in by_image:
            out.add(image["file_name"], by_image[image["id"]])
    return out


def _read_karpathy(path: Path, data: dict, split: str | None) -> CaptionSet:
    out = CaptionSet()
    splits = {"train": {"train", "restval"}}.get(split or "", {split} if split else None)
    for image in data["images"]:
        if splits is not None and image.get("split") not in splits:
            continue
        name = image["filename"]
        if image.get("filepath"):  # COCO's Karpathy file keeps the folder apart
            name = f"{image['filepath']}/{name}"
        out.add(name, [s["raw"].strip() for s in image["sentences"]])
    if not out.images:
        raise CaptionFormatError(f"{path}: no images in split {split!r}")
    return out


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise CaptionFormatError(f"{path}:{n}: not a JSON object ({e})") from e


def _read_rows(path: Path, rows) -> CaptionSet:
    """Rows of {"image": ..., "caption": ...}; an image may have several rows."""
    grouped: dict[str, list[str]] = {}
    for n, row in enumerate(rows, start=1):
        image, caption = row.get("image"), row.get("caption")
        if not image or caption is None:
            raise CaptionFormatError(f"{path}: row {n} needs 'image' and 'caption' fields")
        grouped.setdefault(image, []).append(str(caption).strip())
    out = CaptionSet()
    for image, captions in grouped.items():
        out.add(image, captions)
    return out
