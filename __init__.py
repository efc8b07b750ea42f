"""vqret: cross-modal image retrieval and indexing.

The public API, imported lazily so that `import vqret` (and the CLI's start-up) stays cheap:

    from vqret import Collection, Embedder
    col = Collection.create("photos/")          # store in photos/.vqret
    col.index("photos/")
    for hit in col.search("a red car", k=5):      # or "cat - grass + 2:./dog.jpg"
        print(hit.rank, hit.score, hit.path)
    hits = col.search("a purple elephant", generate="auto")
    hits.generated                                # the drawn picture's record, or None
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Collection": "vqret.api",
    "SearchResult": "vqret.retrieval.collection",
    "SearchResults": "vqret.retrieval.engine",
    "Query": "vqret.retrieval.query",
    "Term": "vqret.retrieval.query",
    "QueryError": "vqret.retrieval.query",
    "IndexReport": "vqret.retrieval.indexer",
    "Embedder": "vqret.retrieval.embedder",
    "ModelSpec": "vqret.retrieval.embedder",
    "WeightsUnavailableError": "vqret.retrieval.embedder",
    "Store": "vqret.retrieval.store",
    "StoreError": "vqret.retrieval.store",
    "load_image": "vqret.retrieval.images",
    "ImageLoadError": "vqret.retrieval.images",
    "generate": "vqret.diffusion.generate",
    "GeneratedImages": "vqret.diffusion.generate",
    "Tokenizer": "vqret.tokenizer.api",
}

__all__ = [
    "Collection",
    "Embedder",
    "GeneratedImages",
    "ImageLoadError",
    "IndexReport",
    "ModelSpec",
    "Query",
    "QueryError",
    "SearchResult",
    "SearchResults",
    "Store",
    "StoreError",
    "Term",
    "Tokenizer",
    "WeightsUnavailableError",
    "__version__",
    "generate",
    "load_image",
]

if TYPE_CHECKING:
    from vqret.api import Collection
    from vqret.diffusion.generate import GeneratedImages, generate
    from vqret.retrieval.collection import SearchResult
    from vqret.retrieval.embedder import Embedder, ModelSpec, WeightsUnavailableError
    from vqret.retrieval.engine import SearchResults
    from vqret.retrieval.images import ImageLoadError, load_image
    from vqret.retrieval.indexer import IndexReport
    from vqret.retrieval.query import Query, QueryError, Term
    from vqret.retrieval.store import Store, StoreError
    from vqret.tokenizer.api import Tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vqret' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
