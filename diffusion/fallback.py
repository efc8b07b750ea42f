"""Generate-on-miss: when a search should synthesize, and the drawing itself.

`generate_on_miss` is the query engine's fallback (vqret.retrieval.engine.Fallback): every
surface passes it in, so the CLI, the server and the Python API draw the same picture for
the same query. It decides on the best score vs a threshold from the collection.

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
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from vqret.retrieval.engine import FallbackOutcome
from vqret.retrieval.query import GENERATE_MODES, Query, QueryError
from vqret.retrieval.store import TEXTS

from .paths import atomic_write, diffusion_path, has_model

if TYPE_CHECKING:  # no torch import here: `vqret search` reads a cached threshold cheaply
    from vqret.retrieval.collection import Collection

__all__ = ["MODES", "Calibration", "calibrate", "decide", "generate_on_miss", "threshold_for"]

MODES = GENERATE_MODES
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
        raise QueryError(f"generate must be auto, never or always, not {mode!r}")
    if mode != "auto":
        return mode == "always"
    return best_score is None or (threshold is not None and best_score < threshold)


# ---- the fallback -----------------------------------------------------------------------------

GENERATED_DIRNAME = "generated"  # STORE/diffusion/generated/<query>.png
_generators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # collection -> Generator
_generators_lock = threading.Lock()


def generate_on_miss(collection: Collection, query: Query, vector: np.ndarray,
                     hits: list, *, run: Callable[[Callable], Any] | None = None
                     ) -> FallbackOutcome:
    """Decide by `query.generate` and draw one picture (seed `query.seed`) when it says so.

    auto: when the best score is below the threshold (the query's, or calibrated on the
    collection and cached beside the model); a store without a model never generates, and
    always there is a QueryError. One text term is drawn through the retrieval prior; any
    other query from its vector (through the same prior). The PNG goes to
    `query.options["generate_out"]` or STORE/diffusion/generated/<query>.png. `run`
    executes the drawing (a server's one-at-a-time queue); the decision is made here.
    """
    mode = query.generate
    model_there = has_model(collection.store)
    if mode == "never" or (mode == "auto" and not model_there):
        return FallbackOutcome(None, None)
    if not model_there:
        raise QueryError(f"{collection.store.path}: generate always needs a diffusion model "
                         "(train one with `vqret diffusion train`)")
    best = hits[0].score if hits else None
    threshold, source = query.threshold, "given"
    if threshold is None:
        calibration = threshold_for(collection)
        threshold, source = calibration.threshold, f"calibrated on {calibration.method}"
    best_text = "no result" if best is None else f"{best:.4f}"
    if not decide(mode, best, threshold):
        return FallbackOutcome(None, f"best score {best_text} >= threshold {threshold:.4f} "
                                     f"({source}): no image generated")
    record = (run or _call)(lambda: _draw(collection, query, vector))
    path = record["path"]
    record.update(best_score=best, threshold=threshold, threshold_source=source, mode=mode)
    reason = "below" if best is not None and best < threshold else "vs"
    return FallbackOutcome(record, f"best score {best_text} {reason} threshold "
                                   f"{threshold:.4f} ({source}): generated {path}")


def _call(fn: Callable) -> Any:
    return fn()


def _draw(collection: Collection, query: Query, vector: np.ndarray) -> dict[str, Any]:
    generator = _generator(collection)
    text = query.single_text
    if text is not None:
        images = generator.generate(text, n=1, seed=query.seed)
    else:
        images = generator.generate(embedding=generator.prior(vector), n=1, seed=query.seed)
    output = query.options.get("generate_out") or _default_output(collection, query)
    path = images.save(output)[0]
    return {**images.to_dicts([path])[0], "prompt": query.prompt}


def _generator(collection: Collection):
    """The collection's Generator, loaded once (a server draws many times)."""
    from .generate import Generator

    with _generators_lock:
        generator = _generators.get(collection)
        if generator is None:
            generator = _generators[collection] = Generator.load(collection)
        return generator


def generated_folder(store: Any) -> Path:
    """Where the fallback's pictures go: STORE/diffusion/generated (a server serves them)."""
    return diffusion_path(store) / GENERATED_DIRNAME


def _default_output(collection: Collection, query: Query) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in query.prompt.lower())[:48].strip("-")
    if query.seed:
        slug = f"{slug or 'query'}-seed{query.seed}"
    return generated_folder(collection.store) / f"{slug or 'query'}.png"
