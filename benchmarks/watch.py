"""How soon `vqret watch` makes a new file searchable, and how it commits a burst.

One run, one machine, one folder, so the numbers compare:

- baselines, in process, before the watcher starts: one incremental pass over the seed folder
  that finds nothing to do (`scan_s`), one that adds a single new file (`one_file_pass_s`),
  and `vqret index` run as a command for that one file (`index_command_s`: what a user does
  without a watcher, model load included);
- latency: `files` images written one at a time while `vqret watch --json` runs in a
  subprocess, each timed from the write to a search (the engine `vqret search` uses, by
  embedding so that the poll costs no model) that returns it; p50 / p95 / max, and p95 over
  both baselines;
- burst: `burst` tiny images copied in at once: the watcher's commits (JSON lines) and the
  store generations they made, and the time from the copy's start to the last commit over
  the time `Collection.index()` takes to index the same files into a fresh store;
- the scan cost of a pass that finds nothing, with the burst in the store (why every round
  is a full incremental pass: retrieval/watch.py).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Log = Callable[[str], Any]
HANG_GUARD_S = 600  # only stops a broken run from hanging


def run_watch_benchmark(
    *,
    model: str = "ViT-B-32",
    pretrained: str = "none",
    files: int = 20,
    burst: int = 5000,
    seed_images: int = 200,
    device: str = "cpu",
    log: Log | None = None,
) -> dict[str, Any]:
    from PIL import Image
    from vqret.api import Collection
    from vqret.retrieval.embedder import Embedder

    say = log or (lambda _m: None)
    rng = np.random.default_rng(0)

    def image(path: Path, side: int) -> None:
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)

    embedder = Embedder(model, pretrained, device=device, num_workers=0)
    with tempfile.TemporaryDirectory(prefix="vqret-bench-watch-") as tmp:
        root = Path(tmp)
        folder = root / "photos"
        folder.mkdir()
        for i in range(seed_images):
            image(folder / f"seed_{i:05d}.png", 64)
        collection = Collection.create(folder, embedder=embedder)
        collection.index()
        past = time.time() - 60  # the seed files are not "being written"
        for path in folder.iterdir():
            if path.is_file():
                os.utime(path, (past, past))
        collection.index()
        scan_s = _median(lambda: collection.index())
        say(f"no-op pass over {seed_images} files: {scan_s:.3f} s")

        def one_file_pass() -> None:
            name = f"base_{time.monotonic_ns()}.png"
            image(folder / name, 64)
            collection.index()
        one_file_pass_s = _median(one_file_pass)
        image(folder / "base_cli.png", 64)
        started = time.perf_counter()
        subprocess.run(_cli("index", str(folder), "--device", device, "--quiet"), check=True)
        index_command_s = time.perf_counter() - started
        say(f"one new file: {one_file_pass_s:.3f} s a pass, {index_command_s:.1f} s `vqret index`")

        watcher = _Watcher(_cli("watch", str(folder), "--device", device, "--json"))
        try:
            watcher.next_round()  # the first pass: the watch is set up
            store = collection.store
            probe = rng.standard_normal(store.dim).astype(np.float32)
            latencies = []
            for i in range(files):
                name = f"late_{i:03d}.png"
                written = time.perf_counter()
                image(folder / name, 64)
                while name not in {h.path for h in collection.search(
                        embedding=probe, k=len(store) + files + 10)}:
                    if time.perf_counter() - written > HANG_GUARD_S:
                        raise RuntimeError(f"{name} never showed up")
                    time.sleep(0.02)
                latencies.append(time.perf_counter() - written)
                watcher.drain()
                time.sleep(1.0)  # the next file is a burst of its own
            say(f"latency p95 {np.percentile(latencies, 95):.2f} s over {files} files")

            staging = root / "staging"
            staging.mkdir()
            for i in range(burst):
                image(staging / f"{i:05d}.png", 8)
            watcher.drain()
            generation = store.generation
            started = time.perf_counter()
            (folder / "burst").mkdir()
            for path in sorted(staging.iterdir()):
                shutil.copy(path, folder / "burst" / path.name)
            rounds = []
            while sum(r["added"] for r in rounds) < burst:
                rounds.append(watcher.next_round())
            burst_s = time.perf_counter() - started
            store.refresh()
            generations = store.generation - generation
            say(f"{burst} files: {len(rounds)} commits, {burst_s:.1f} s")
        finally:
            watcher.stop()
        scan_burst_s = _median(lambda: collection.index())
        fresh = Collection.create(staging, root / "fresh", embedder=embedder)
        started = time.perf_counter()
        fresh.index()
        batch_s = time.perf_counter() - started

    p = np.percentile(latencies, [50, 95])
    return {
        "model": model,
        "files_timed": files,
        "scan_s": round(scan_s, 3),
        "one_file_pass_s": round(one_file_pass_s, 3),
        "index_command_s": round(index_command_s, 2),
        "latency_p50_s": round(float(p[0]), 3),
        "latency_p95_s": round(float(p[1]), 3),
        "latency_max_s": round(max(latencies), 3),
        "p95_over_one_file_pass": round(float(p[1]) / one_file_pass_s, 2),
        "p95_over_index_command": round(float(p[1]) / index_command_s, 2),
        "burst_files": burst,
        "burst_commits": len(rounds),
        "burst_generations": generations,
        "burst_s": round(burst_s, 2),
        "burst_over_batch_index": round(burst_s / batch_s, 2),
        "scan_with_burst_s": round(scan_burst_s, 3),
    }


def _median(step: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vqret.cli.main", *args]


class _Watcher:
    """`vqret watch --json` in a subprocess; its lines as they come."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_round(self) -> dict[str, Any]:
        try:
            return json.loads(self.lines.get(timeout=HANG_GUARD_S))
        except queue.Empty:
            raise RuntimeError(f"the watcher printed nothing in {HANG_GUARD_S} s") from None

    def drain(self) -> None:
        while not self.lines.empty():
            self.lines.get()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
