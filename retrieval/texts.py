"""Texts as first-class rows: sidecar captions and caption files, embedded into the text table.

Sidecars: `photo.txt` (the whole file) or `photo.json` with a "caption" field (a string or a
list of strings) beside `photo.jpg`; each caption becomes a row linked to the image's id.
Caption files: a CSV or JSONL with a `text` (or `caption`) column and an optional `image`
column (a path relative to the indexed folder) linking the text to an image.

Rows are keyed by (source, text): re-running embeds only texts that are new, and removes rows
whose source no longer says them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .store import TEXTS, Failure, Store, StoreWriter, embeddings_to_arrow, now_utc

if TYPE_CHECKING:  # torch: only when a text is embedded
    from .embedder import Embedder

FILE_SOURCE = "file:"  # prefix of rows that came from `vqret index-texts FILE`


def is_sidecar(source: str) -> bool:
    return not source.startswith(FILE_SOURCE)


def from_file(name: str) -> Callable[[str], bool]:
    return lambda source: source.startswith(f"{FILE_SOURCE}{name}:")


@dataclass(frozen=True)
class TextRow:
    text: str
    source: str  # sidecar path (relative to the folder), or "file:captions.csv:12"
    image_id: int | None

    @property
    def key(self) -> str:
        return hashlib.blake2b(f"{self.source}\0{self.text}".encode(), digest_size=16).hexdigest()


@dataclass
class TextReport:
    added: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[Failure] | None = None

    def to_dict(self) -> dict:
        return {
            "added": self.added,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": [f.to_dict() for f in self.failed or []],
        }


def _sidecar_captions(path: Path) -> list[str]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        return [text] if text else []
    data = json.loads(path.read_text(encoding="utf-8"))
    caption = data.get("caption") if isinstance(data, dict) else None
    if caption is None:
        return []
    captions = caption if isinstance(caption, list) else [caption]
    return [str(c).strip() for c in captions if str(c).strip()]


def sidecar_rows(folder: Path, images: dict[str, int], failures: list[Failure]) -> list[TextRow]:
    """Caption rows from `photo.txt` / `photo.json` beside each indexed image (path -> id)."""
    rows: list[TextRow] = []
    # One listing per folder, not two stats per image: at 10,000 photos this was most of a
    # no-op `vqret index` (0.9 s of 1.0).
    listed: dict[str, set[str]] = {}
    for relpath, image_id in sorted(images.items()):
        parent, _, name = relpath.rpartition("/")
        names = listed.get(parent)
        if names is None:
            try:
                names = listed[parent] = set(os.listdir(folder / parent))
            except OSError:
                names = listed[parent] = set()
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
        for suffix in (".txt", ".json"):
            if stem + suffix not in names:
                continue
            rel = f"{parent}/{stem}{suffix}" if parent else f"{stem}{suffix}"
            path = folder / rel
            if not path.is_file():
                continue
            try:
                captions = _sidecar_captions(path)
            except (OSError, ValueError) as e:
                failures.append(Failure(rel, f"unreadable caption sidecar ({e})".splitlines()[0]))
                continue
            rows.extend(TextRow(c, rel, image_id) for c in captions)
    return rows


def caption_file_rows(path: Path, image_ids: dict[str, int]) -> list[TextRow]:
    """Rows of a CSV/JSONL caption file; `image` paths link to image ids when indexed."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
    else:
        raise ValueError(f"{path}: texts come as .csv or .jsonl (a text or caption column)")
    rows = []
    for n, record in enumerate(records, start=1):
        text = record.get("text", record.get("caption"))
        if text is None or not str(text).strip():
            raise ValueError(f"{path}: row {n} has no 'text' (or 'caption') value")
        image = record.get("image")
        source = f"{FILE_SOURCE}{path.name}:{n}"
        rows.append(TextRow(str(text).strip(), source, image_ids.get(image)))
    return rows


def sync_texts(
    writer: StoreWriter,
    embedder: Embedder,
    rows: list[TextRow],
    owned: Callable[[str], bool],
) -> TextReport:
    """Make the text table hold exactly `rows` for the sources it covers.

    `owned(source) -> bool` says which existing rows this sync is responsible for (e.g. all
    sidecars, or one caption file's rows); those not in `rows` any more are removed.
    """
    store: Store = writer.store
    existing = store.read_table(["id", "source", "hash", "image_id"], TEXTS).to_pylist()
    wanted = {r.key: r for r in rows}
    report = TextReport(failed=[])
    keep, drop = set(), []
    for old in existing:
        if not owned(old["source"]):
            continue
        row = wanted.get(old["hash"])
        if row is not None and row.image_id == old["image_id"]:
            keep.add(old["hash"])
            report.unchanged += 1
        else:
            drop.append(old["id"])
    new = [r for k, r in wanted.items() if k not in keep]
    report.removed = len(drop)
    report.added = len(new)
    if not new and not drop:
        return report
    table = None
    if new:
        vectors = embedder.embed_texts([r.text for r in new])
        ids = writer.allocate_ids(len(new), TEXTS)
        table = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "text": [r.text for r in new],
                "source": [r.source for r in new],
                "image_id": pa.array([r.image_id for r in new], pa.int64()),
                "hash": [r.key for r in new],
                "embedding": embeddings_to_arrow(np.asarray(vectors, np.float32)),
                "added_at": pa.array([now_utc()] * len(new), pa.timestamp("us", "UTC")),
            }
        )
    writer.commit(table, remove_ids=drop, table=TEXTS)
    return report
