"""An embedder made on first use, so that a run with nothing to embed never loads a model.

A no-op `vqret index` (nothing changed since the last run) lists, stats and compares; it used
to spend most of its time importing torch and open_clip and loading weights that no row
needed (8.3 s for 1.0 s of work on 10,000 photos). The indexer decides from the listing,
the stored sizes and mtimes and the content hashes which files need the model, and touches
the embedder only for those: this stand-in answers `spec` (the store's, known without
torch) and builds the real embedder the first time anything else is asked of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .model_spec import ModelSpec

if TYPE_CHECKING:
    from .embedder import Embedder


class DeferredEmbedder:
    """Stands in for the Embedder `make()` returns; calls it on first real use (once)."""

    # read by the Indexer before any file is embedded: the local Embedder doesn't hash
    # what it reads (only the Ray engine's does), and asking must not load the model
    hashes_what_it_reads = False

    def __init__(self, spec: ModelSpec, make: Callable[[], Embedder]):
        self.spec = spec
        self._make = make
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the model was needed (and so is in memory) by now."""
        return self._embedder is not None

    def get(self) -> Embedder:
        """The real embedder, made now if it wasn't."""
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    self._embedder = self._make()
        return self._embedder

    def __getattr__(self, name: str) -> Any:
        # only for names not set above: everything an Embedder does needs the model
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.get(), name)
