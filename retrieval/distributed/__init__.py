"""Scale out on Ray: embed through a Ray Data actor pool, build big IVF indexes shard by shard.

`vqret index SOURCE --engine ray` runs the same `Indexer` as the local engine; only the two
steps that read images, and the index build of a big table, move to the cluster:

    driver: walk (size, mtime) ->  Ray tasks: hash new and changed files  ->  driver: plan
        ->  Ray Data: (position, path) blocks  ->  map_batches(actor pool: model loaded once
            per actor, 1 GPU each when the cluster has GPUs)
        ->  iter_batches on the driver  ->  Indexer commits
        ->  a big IVF table: sample, train, fill shards in Ray tasks, merge, tune

The driver reads no image. Results stream back as actors finish batches (no
materialisation), so the driver commits while the cluster keeps embedding, and a killed run
loses at most what wasn't committed.

One module per job:
- `cluster`: joining or starting Ray, its resources, Ray Data in and out, one-line errors
  when the cluster (not a file) is the problem;
- `embedding`: `RayEmbedder`, the actor pool that embeds images and the tasks that hash them;
- `sharded_index`: `build_sharded_index`, the IVF index of a big table built shard by shard;
- `indexing`: `index_folder_with_ray`, the Indexer with the three above plugged in.

Ray is an optional extra (`pip install 'vqret[ray]'`): nothing here imports it at module
level, and the names below are imported on first use, so `cluster` (the install hint) loads
without torch or faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module of this package that defines it
_EXPORTS = {
    "INSTALL_HINT": "cluster",
    "ClusterUnreachableError": "cluster",
    "RayUnavailableError": "cluster",
    "RayWorkerError": "cluster",
    "connect": "cluster",
    "require_ray": "cluster",
    "RayEmbedder": "embedding",
    "build_sharded_index": "sharded_index",
    "ray_update_after_write": "sharded_index",
    "ray_update_index": "sharded_index",
    "index_folder_with_ray": "indexing",
    "indexer_options": "indexing",
}

__all__ = [
    "INSTALL_HINT",
    "ClusterUnreachableError",
    "RayEmbedder",
    "RayUnavailableError",
    "RayWorkerError",
    "build_sharded_index",
    "connect",
    "index_folder_with_ray",
    "indexer_options",
    "ray_update_after_write",
    "ray_update_index",
    "require_ray",
]

if TYPE_CHECKING:
    from .cluster import (
        INSTALL_HINT,
        ClusterUnreachableError,
        RayUnavailableError,
        RayWorkerError,
        connect,
        require_ray,
    )
    from .embedding import RayEmbedder
    from .indexing import index_folder_with_ray, indexer_options
    from .sharded_index import build_sharded_index, ray_update_after_write, ray_update_index


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
