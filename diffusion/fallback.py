"""When `vqret search` should synthesize: the best score vs a threshold from the collection.

The threshold is calibrated on the collection itself, because what a "good" cosine is
depends on the CLIP model and the pictures:
- with captions in the store (text rows), it is the CAPTION_PERCENTILE-th percentile of the
  best image score of each caption: texts that do describe the collection nearly all pass;
- without, it is the PROBE_PERCENTILE-th percentile of the best image scores of PROBES,
  generic texts about everyday things: a query must match the collection better than most
  such probes do to count as answered.
It is cached in STORE/diffusion/threshold.json with the store generation, CLIP model and
method it was computed for, and recomputed when any of them changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from vqret.retrieval.store import TEXTS

from .paths import atomic_write, diffusion_path

if TYPE_CHECKING:  # no torch import here: `vqret search` reads a cached threshold cheaply
    from vqret.retrieval.collection import Collection

__all__ = ["MODES", "Calibration", "calibrate", "decide", "threshold_for"]

MODES = ("auto", "never", "always")
THRESHOLD_FILE = "threshold.json"
CAPTION_PERCENTILE = 5.0
PROBE_PERCENTILE = 75.0
MAX_CAPTIONS = 1000
_THINGS = (
    "dog", "cat", "car", "bicycle", "tree", "house", "person", "child", "bird", "horse",
    "boat", "airplane", "train", "flower", "mountain", "beach", "city street", "kitchen",
    "laptop", "book", "chair", "table", "pizza", "cake", "bowl of fruit", "river", "forest",
    "snowy field", "sunset", "bridge", "guitar", "clock", "phone", "shoe", "hat", "bus",
    "building at night", "desert", "waterfall", "crowd", "old man", "woman smiling",
    "football match", "map", "painting", "toy", "truck", "fish", "cow", "sheep",
)
PROBES = tuple(f"a photo of a {thing}" for thing in _THINGS)


@dataclass
class Calibration:
    threshold: float
    method: str  # "captions" or "probes"
    percentile: float
    samples: int
    generation: int  # the store generation it was computed at
    clip_weights: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(collection: Collection) -> Calibration:
    """Compute the threshold for `collection` (see the module docstring)."""
    store = collection.store
    captions = store.count(TEXTS)
    if captions:
        rows = store.read_table(["embedding"], TEXTS)
        vectors = np.array(rows.column("embedding").to_pylist()[:MAX_CAPTIONS], np.float32)
        method, percentile = "captions", CAPTION_PERCENTILE
    else:
        # one at a time through query_embedding: the collection's torch-free text path
        vectors = [collection.query_embedding(text=probe) for probe in PROBES]
        method, percentile = "probes", PROBE_PERCENTILE
    best = [collection.search(embedding=v, k=1)[0].score for v in vectors]
    return Calibration(float(np.percentile(best, percentile)), method, percentile, len(best),
                       store.generation, store.spec.weights_id)


def threshold_for(collection: Collection, model: str | Path | None = None) -> Calibration:
    """The cached calibration of `collection`, recomputed (and cached) when stale."""
    store = collection.store
    cache = diffusion_path(store, model)
    cache = (cache.parent if cache.suffix == ".safetensors" else cache) / THRESHOLD_FILE
    wanted_method = "captions" if store.count(TEXTS) else "probes"
    try:
        data = json.loads(cache.read_text())
        cached = Calibration(**data)
        if (cached.generation == store.generation and cached.clip_weights == store.spec.weights_id
                and cached.method == wanted_method):
            return cached
    except (OSError, ValueError, TypeError):
        pass  # missing or unreadable: compute it again
    calibration = calibrate(collection)
    try:
        atomic_write(cache, lambda tmp: Path(tmp).write_text(json.dumps(calibration.to_dict())))
    except OSError:
        pass  # a read-only store still answers; it just calibrates again next time
    return calibration


def decide(mode: str, best_score: float | None, threshold: float | None) -> bool:
    """Whether to generate: always; never; auto when the best score is below threshold (or
    there is no result at all)."""
    if mode not in MODES:
        raise ValueError(f"--generate must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    return best_score is None or (threshold is not None and best_score < threshold)
