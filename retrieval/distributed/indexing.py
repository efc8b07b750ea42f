"""`index_folder` on Ray: the local engine's Indexer, with the steps that read images and
the big index build moved to the cluster.

Everything else (walk, plan, ids, commits, failure reports) is the Indexer's own, so the
incremental rules are the local engine's by construction. `indexer_options` is what changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..embedder import Embedder, ModelSpec
from ..indexer import IndexReport, index_folder
from ..store import Store
from .cluster import require_ray
from .embedding import RayEmbedder
from .sharded_index import ray_update_after_write

# Rows per commit (the Indexer also commits every 30 s). Each commit writes a Parquet part and
# rewrites the manifest, which lists every part: at the local engine's 512 rows, a cluster
# embedding thousands of images a second would write 200k parts for 100M images, and a
# manifest that grows with each of them.
COMMIT_ROWS = 65536


def indexer_options(embedder: RayEmbedder) -> dict[str, Any]:
    """What the Ray engine changes in the local engine's `Indexer`: new files are hashed on
    the cluster (and an old store's rows have their metadata read there when it is
    upgraded), commits are bigger, and big collections build their IVF index in parallel
    tasks too."""
    return {
        "hasher": embedder.hash_files,
        "facts_reader": embedder.read_facts,
        "commit_every": COMMIT_ROWS,
        "index_updater": ray_update_after_write,
    }


def index_folder_with_ray(
    store: Store,
    spec: ModelSpec,
    folder: Path | str,
    address: str | None = None,
    *,
    wait: float = 0,
    num_workers: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "fp32",
    text_embedder: Embedder | None = None,
    **indexer_kwargs: Any,
) -> IndexReport:
    """`index_folder`, with the images embedded on Ray (local Ray when `address` is None).

    Everything but the model step is the local engine's `Indexer`; `indexer_kwargs` are its
    options (commit_every, on_progress, on_failure, index_kind, ...). `folder` may be an
    fsspec URL (rows then keep each object's URL). Ray is shut down at the end only if this
    call started it.
    """
    require_ray()
    embedder = RayEmbedder(
        spec,
        address=address,
        num_workers=num_workers,
        batch_size=batch_size,
        device=device,
        precision=precision,
        text_embedder=text_embedder,
    )
    # A URL is listed through fsspec on the driver (index_folder gives the Indexer its source)
    for name, value in indexer_options(embedder).items():
        indexer_kwargs.setdefault(name, value)
    try:
        return index_folder(store, embedder, folder, wait=wait, **indexer_kwargs)
    finally:
        embedder.close()


__all__ = ["COMMIT_ROWS", "index_folder_with_ray", "indexer_options"]
