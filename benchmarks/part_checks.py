"""What verifying parts costs: reading a store with its size + CRC-32 checks against without.

A store of n random unit vectors (d dims) in parts of `part_rows` is written once; then, timed
alternately (median of `repeats`), in this process with the files in the page cache (the CPU
cost of the checks, not a cold disk's):
- `lookup`: a fresh Store reading ["id", "path"], what a search reads to name its hits;
- `vectors`: a fresh Store reading ["id", "embedding"], what rebuilding an index reads;
- `index`: loading the saved flat index (`load_saved`), which checks the index file;
each *verified* (the checksums computed, the per-process cache emptied first), *cached* (the
cache kept: a server's second read, or a part already verified) and *unchecked* (a manifest
without checks: what a store written before them costs). And `write`: one commit of a part
with its check and recovery copy, against the part alone; `recovery_share`: the recovery
copies' bytes over the parts'.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from vqret.retrieval import index as index_module
from vqret.retrieval import part_health, store_writer
from vqret.retrieval.index import build_index, load_saved, save_index
from vqret.retrieval.model_spec import ModelSpec
from vqret.retrieval.part_health import RECOVERY
from vqret.retrieval.store import IMAGES, Store, embeddings_to_arrow, now_utc


def _rows(ids: np.ndarray, dim: int, rng: np.random.Generator) -> pa.Table:
    vectors = rng.standard_normal((len(ids), dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "path": [f"photos/2024/trip-{i // 1000:04d}/IMG_{i:07d}.jpg" for i in ids.tolist()],
        "size": pa.array(rng.integers(1 << 20, 8 << 20, len(ids)), pa.int64()),
        "mtime_ns": pa.array(rng.integers(1 << 60, 1 << 61, len(ids)), pa.int64()),
        "hash": [f"{i:032x}" for i in ids.tolist()],
        "embedding": embeddings_to_arrow(vectors),
        "added_at": pa.array([now_utc()] * len(ids), pa.timestamp("us", "UTC")),
    })


def _median(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(n: int = 100_000, dim: int = 512, part_rows: int = 25_000, repeats: int = 5,
        folder: Path | None = None) -> dict[str, Any]:
    """The timings (seconds) and their ratios to the unchecked read (module docstring)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        spec = ModelSpec(model="bench", pretrained="none", weights_id="none", embed_dim=dim)
        store = Store.create(root / ".vqret", spec, root)
        write_checked, write_plain = [], []
        plain_extras = store_writer.write_part_extras
        with store.writer() as writer:
            for start in range(0, n, part_rows):
                rows = _rows(np.arange(start, min(n, start + part_rows)), dim, rng)
                checked = (start // part_rows) % 2 == 0  # alternate: same disk, same load
                if not checked:
                    store_writer.write_part_extras = lambda *a, **k: {}
                t = time.perf_counter()
                writer.commit(rows)
                (write_checked if checked else write_plain).append(time.perf_counter() - t)
                store_writer.write_part_extras = plain_extras
        # every part gets its check and copy (the unchecked half was written without)
        with store.writer() as writer:
            for part in store.parts():
                writer.set_part_columns(part, {})
        save_index(store, build_index(*store.vectors()))
        path = store.path
        parts_bytes = sum(f.stat().st_size for f in (path / IMAGES).iterdir())
        recovery_bytes = sum(f.stat().st_size for f in (path / RECOVERY / IMAGES).iterdir())

        def read(columns: list[str], mode: str) -> Callable[[], Any]:
            def go() -> Any:
                if mode == "verified":
                    part_health._crcs.clear()
                s = Store(path)
                if mode == "unchecked":
                    s.manifest["tables"][IMAGES]["checks"] = {}
                return s.read_table(columns)
            return go

        def load(mode: str) -> Callable[[], Any]:
            def go() -> Any:
                if mode == "verified":
                    part_health._crcs.clear()
                if mode != "unchecked":
                    return load_saved(Store(path))
                real = index_module.index_damage  # as an index saved before the checks
                index_module.index_damage = lambda *a, **k: None
                try:
                    return load_saved(Store(path))
                finally:
                    index_module.index_damage = real
            return go

        out: dict[str, Any] = {"n": n, "dim": dim, "part_rows": part_rows, "parts": n // part_rows,
                               "repeats": repeats}
        for name, make in (("lookup", lambda m: read(["id", "path"], m)),
                           ("vectors", lambda m: read(["id", "embedding"], m)),
                           ("index", load)):
            make("cached")()  # warm the page cache and the crc cache
            times = {m: [] for m in ("unchecked", "verified", "cached")}
            for _ in range(repeats):  # alternate the modes: the same load on each
                for mode in times:
                    times[mode].append(_median(make(mode), 1))
            base = statistics.median(times["unchecked"])
            out[name] = {m: round(statistics.median(t), 6) for m, t in times.items()}
            out[name]["verified_ratio"] = round(statistics.median(times["verified"]) / base, 2)
            out[name]["cached_ratio"] = round(statistics.median(times["cached"]) / base, 2)
        out["write"] = {
            "checked": round(statistics.median(write_checked), 6),
            "plain": round(statistics.median(write_plain), 6) if write_plain else None,
        }
        if write_plain:
            out["write"]["ratio"] = round(out["write"]["checked"] / out["write"]["plain"], 2)
        out["recovery_share"] = round(recovery_bytes / parts_bytes, 4)
        out["crc32_gb_per_s"] = round(parts_bytes / 1e9 / _median(
            lambda: [part_health.crc32_file(f) for f in (path / IMAGES).iterdir()], repeats), 2)
    return out
