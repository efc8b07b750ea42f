"""`vqret bench startup`: what the commands a user types cost as whole processes.

Timed in one run, in turns (floor, --help, info, no-op index, cold search, floor, ...) so
that a burst of load from other processes falls on all of them, each a new process timed
from the outside, with its peak RSS (from wait4):

- the floor: `python -c "import numpy"`, the least any command of ours can cost;
- `vqret --help`;
- `vqret info` on the search store;
- a no-op `vqret index` of `rows` small JPEGs (nothing changed since the last run: the plan
  finds nothing to embed, so no model is loaded; the store is made once with a small
  architecture of random weights, `configs/startup-tiny.json`, since which model made the
  rows changes nothing a no-op run does);
- a cold `vqret search "text"` on a store of `model` (default ViT-B-32, random weights:
  the ONNX text tower's size and load time don't depend on the weights' values).

One unmeasured round comes first ("cold" is a new process, not a cold page cache). The top-10
check compares, for each probe text, the ONNX path's top-10 with the fp32 torch path's on
the same store (with random weights that is a numeric check of the export, not of quality).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TINY_CONFIG = Path(__file__).parent / "configs" / "startup-tiny.json"
COLD_QUERY = "a photo of a red car"
PROBE_TEXTS = (
    "a photo of a red car", "a dog on the beach", "sunset over the sea", "a red circle",
    "a green triangle", "a blue star on white", "a person riding a bike",
    "a cat sleeping on a sofa", "snow-covered mountains", "a bowl of fruit",
)
COMMANDS = ("floor", "help", "info", "noop_index", "cold_search")


def make_jpegs(folder: Path, n: int, size: int = 32, seed: int = 0) -> None:
    """`n` small JPEGs of random blocks, 1,000 to a subfolder (as photos are kept)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((size, size)).save(sub / f"{i:06d}.jpg", quality=85)


def _store_rows(folder: Path) -> int:
    manifest = folder / ".vqret" / "manifest.json"
    try:
        return int(json.loads(manifest.read_text())["tables"]["images"]["rows"])
    except (OSError, ValueError, KeyError):
        return -1


def build_store(folder: Path, n: int, model: str, pretrained: str, *,
                log: Callable[[str], Any] | None = None) -> Path:
    """A store of `n` small JPEGs in `folder` indexed with `model` and its text encoder
    exported, as `vqret index` leaves it; an existing one of that size is kept."""
    if _store_rows(folder) == n:
        return folder / ".vqret"
    from vqret import Collection

    if log:
        log(f"making a store of {n} images with {Path(model).stem} in {folder} ...")
    make_jpegs(folder, n)
    collection = Collection.create(folder, model=model, pretrained=pretrained,
                                   precision="auto", rebuild=True)
    collection.index()
    status = collection.prepare_fast_text_search()
    if log:
        log(f"  text encoder: {status}")
    return collection.store.path


# Runs one command and reports its wall time and peak RSS. A small process of its own: on
# Linux a child's ru_maxrss counts the memory of the process it was forked from before its
# exec, so spawning from the benchmark (which may hold a model) would report that.
LAUNCHER = r"""
import json, os, subprocess, sys, time
argv, out, err = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(out, "wb") as o, open(err, "wb") as e:
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=o, stderr=e)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "rss_kib": usage.ru_maxrss,
                  "cpu": usage.ru_utime + usage.ru_stime,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def run_timed(argv: Sequence[str], env: dict[str, str] | None = None
              ) -> tuple[float, int, str]:
    """(seconds, peak RSS in MiB, stdout) of one whole process."""
    seconds, rss, _cpu, stdout = run_measured(argv, env)
    return seconds, rss, stdout


def run_measured(argv: Sequence[str], env: dict[str, str] | None = None
                 ) -> tuple[float, int, float, str]:
    """(wall seconds, peak RSS in MiB, CPU seconds (user + system), stdout) of one whole
    process. CPU time is the steadier figure on a machine others load: waiting for a core
    counts in the wall time only."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        launched = subprocess.run(
            [sys.executable, "-c", LAUNCHER, json.dumps(list(argv)), str(out), str(err)],
            capture_output=True, text=True, env=env, timeout=600, check=True,
        )
        report = json.loads(launched.stdout)
        if report["code"] != 0:
            cause = err.read_text(errors="replace").strip()[-400:]
            raise RuntimeError(f"{' '.join(argv[:5])} failed: {cause}")
        # ru_maxrss is in KiB on Linux
        return (report["seconds"], int(report["rss_kib"] // 1024), report["cpu"],
                out.read_text())


def commands(noop_folder: Path, search_store: Path, query: str = COLD_QUERY
             ) -> dict[str, list[str]]:
    vqret = [sys.executable, "-m", "vqret.cli.main"]
    return {
        "floor": [sys.executable, "-c", "import numpy"],
        "help": [*vqret, "--help"],
        "info": [*vqret, "info", "--store", str(search_store)],
        "noop_index": [*vqret, "index", str(noop_folder), "--json"],
        "cold_search": [*vqret, "search", query, "--store", str(search_store), "--json"],
    }


def measure_startup(noop_folder: Path, search_store: Path, *, repeats: int = 5,
                    query: str = COLD_QUERY) -> dict[str, Any]:
    """Median and min seconds, ratio to the floor and peak RSS of each command."""
    from .speed import CpuWatch

    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    argv = commands(noop_folder, search_store, query)
    env = dict(os.environ)
    outputs: dict[str, str] = {}
    for name in COMMANDS:  # unmeasured: page cache, .pyc files
        outputs[name] = run_measured(argv[name], env)[3]
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    rss: dict[str, list[int]] = {name: [] for name in COMMANDS}
    cpu: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with CpuWatch() as watch:
        for _ in range(repeats):
            for name in COMMANDS:
                seconds, peak, used, outputs[name] = run_measured(argv[name], env)
                times[name].append(seconds)
                rss[name].append(peak)
                cpu[name].append(used)
    noop = json.loads(outputs["noop_index"])
    if noop["embedded"] or noop["added"] or noop["updated"] or noop["removed"]:
        raise RuntimeError(f"the no-op index wasn't one: {noop}")
    floor = statistics.median(times["floor"])
    result: dict[str, Any] = {"repeats": repeats, "noop_index_rows": noop["unchanged"]}
    for name in COMMANDS:
        median = statistics.median(times[name])
        result[f"{name}_s"] = round(median, 3)
        result[f"{name}_s_min"] = round(min(times[name]), 3)
        result[f"{name}_rss_mib"] = max(rss[name])
        result[f"{name}_cpu_s"] = round(statistics.median(cpu[name]), 3)
        if name != "floor":
            result[f"{name}_x_floor"] = round(median / floor, 2)
            # the fastest runs' ratio: bursts of other processes' load fall on few runs
            result[f"{name}_min_x_floor_min"] = round(min(times[name]) / min(times["floor"]), 2)
    result["noop_index_scan_s"] = noop["seconds"]
    result["cold_search_hits"] = len(json.loads(outputs["cold_search"]))
    result["other_cpu_pct"] = watch.other_pct
    return result


def top10_agreement(store: Path, texts: Sequence[str] = PROBE_TEXTS, k: int = 10
                    ) -> dict[str, Any]:
    """For each probe text: the ONNX path's top-k against the fp32 torch path's, and the
    cosine of their query embeddings."""
    import numpy as np
    from vqret import Collection

    onnx = Collection.open(store, device="cpu", one_shot=True)
    torch_path = Collection.open(store, device="cpu", text_encoder="torch")
    same, cosines = 0, []
    for text in texts:
        a = [h.id for h in onnx.search(text=text, k=k)]
        b = [h.id for h in torch_path.search(text=text, k=k)]
        same += a == b
        cosines.append(float(np.dot(onnx.query_embedding(text=text),
                                    torch_path.query_embedding(text=text))))
    if onnx.text_path_reason != "":
        raise RuntimeError(f"the ONNX text path wasn't taken: {onnx.text_path_reason}")
    return {"probe_texts": len(texts), "same_top10": same,
            "min_query_cosine": round(min(cosines), 7)}


def run_startup_benchmark(
    workdir: str | os.PathLike,
    *,
    rows: int = 10_000,
    model: str = "ViT-B-32",
    pretrained: str = "none",
    search_images: int = 200,
    repeats: int = 5,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Make (or reuse) the two stores in `workdir`, then time the commands."""
    workdir = Path(workdir)
    noop_folder = workdir / f"noop-{rows}"
    build_store(noop_folder, rows, str(TINY_CONFIG), "none", log=log)
    search_folder = workdir / f"search-{Path(model).stem}-{search_images}"
    search_store = build_store(search_folder, search_images, model, pretrained, log=log)
    bundle = search_store / "text_encoder"
    result: dict[str, Any] = {
        "model": Path(model).stem,
        "pretrained": pretrained,
        "search_rows": search_images,
        "text_encoder_mib": round(sum(p.stat().st_size for p in bundle.iterdir()) / 2**20, 1)
        if bundle.is_dir() else None,
    }
    if log:
        log(f"timing {', '.join(COMMANDS)} in turns, {repeats} rounds ...")
    result.update(measure_startup(noop_folder, search_store, repeats=repeats))
    result.update(top10_agreement(search_store))
    return result
