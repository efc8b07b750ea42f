"""Indexing throughput next to a plain open_clip loop, text query latency, and matmul GFLOP/s.

Absolute images/s depend on the machine, so the headline number is a ratio to a baseline
measured in the same run, on the same files, at the same batch size and torch thread count:
the loop a user would write with open_clip alone. What differs between the two paths is
what vqret adds on purpose:

- vqret decodes and preprocesses in DataLoader worker processes while the model runs (the
  workers are forked for every `iter_image_files` call, so their start-up is timed too);
- vqret asks the JPEG decoder for a reduced-size draft (1/2, 1/4, 1/8 scale) when a file is
  at least twice the model's input size, instead of decoding every pixel;
- vqret loads images through `load_image` (EXIF orientation, alpha over white, 16-bit),
  and runs the model under `inference_mode` and returns normalised numpy vectors.

The plain loop is single-process: decode, preprocess and encode take turns on one process.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vqret.retrieval.embedder import Embedder, resolve_device
from vqret.retrieval.walk import walk_images

Log = Callable[[str], Any]

TEXT_QUERY = "a photo of a dog"
TEXT_WARMUP = 3
TEXT_CALLS = 20
MATMUL_SIZE = 2048
MATMUL_SECONDS = 1.0


def run_speed_benchmark(
    images: Path,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "none",
    batch_size: int = 32,
    limit: int = 512,
    device: str = "cpu",
    workers: int | None = None,
    precision: str = "auto",
    upscale_megapixels: float | None = None,
    cold_repeats: int = 0,
    log: Log | None = None,
) -> dict[str, Any]:
    """Measure vqret's indexing images/s, a plain open_clip loop's, and text query latency.

    Uses up to `limit` image files under `images` (walk order); with `upscale_megapixels`,
    JPEG copies of them enlarged to that many megapixels (camera-sized photos, made once
    into a cache folder). With `cold_repeats`, also a cold `vqret search` (a new process)
    through the ONNX text encoder against the torch path, that many times each, on a store of
    the first batch of images (benchmarks/cold_query.py). Returns a flat JSON-able dict.
    """

    def say(message: str) -> None:
        if log is not None:
            log(message)

    root = Path(images)
    if not root.is_dir():
        raise ValueError(f"not a folder: {root}")
    if limit < 1:
        raise ValueError("limit must be >= 1")
    paths = [str(root / e.relpath) for e in itertools.islice(walk_images(root), limit)]
    if not paths:
        raise ValueError(f"no image files under {root}")
    if upscale_megapixels is not None:
        say(f"upscaling {len(paths)} images to {upscale_megapixels:g} MP JPEGs (cached)")
        paths = upscaled_copies(paths, root, upscale_megapixels)
    # Read every file once so that neither path pays for cold disk reads the other doesn't.
    nbytes = sum(len(Path(p).read_bytes()) for p in paths)
    say(f"{len(paths)} images ({nbytes / 1e6:.1f} MB) under {root}")

    # Measured before any model exists or worker process runs, so nothing competes with it.
    with CpuWatch() as matmul_watch:
        gflops = matmul_gflops(device)
    say(
        f"matmul fp32 {MATMUL_SIZE}x{MATMUL_SIZE}: {gflops:.1f} GFLOP/s, "
        f"{torch.get_num_threads()} torch threads{matmul_watch.note()}"
    )

    say(f"loading {model} (pretrained={pretrained}, precision={precision}) for vqret")
    embedder = Embedder(
        model,
        pretrained,
        device=device,
        batch_size=batch_size,
        num_workers=workers,
        precision=precision,
    )
    # The roof is the matmul rate at the precision vqret runs: bf16 GEMMs on a CPU with
    # AVX512-BF16 run at ~2.5x fp32's rate.
    roof_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(embedder.precision)
    roof_gflops = gflops if roof_dtype is None else matmul_gflops(device, dtype=roof_dtype)
    image_gflop = model_gflop_per_image(embedder)
    roof_rate = roof_gflops / image_gflop
    say(
        f"{embedder.precision} matmul {roof_gflops:.1f} GFLOP/s; the model costs "
        f"{image_gflop:.2f} GFLOP/image: roof {roof_rate:.1f} images/s"
    )
    # iter_image_files caps the worker count so that each worker gets at least one batch;
    # report the count it actually runs with.
    n_workers = min(embedder.num_workers, max(1, len(paths) // embedder.batch_size))

    say("vqret: warm-up batch, then timed pass")
    vqret = _time_vqret(embedder, paths)
    say(f"vqret: {vqret} ({n_workers} workers)")

    say("text query latency")
    with CpuWatch() as text_watch:
        text_ms = _text_latency_ms(embedder)
    say(f"text query: p50 {statistics.median(text_ms):.1f} ms{text_watch.note()}")
    cold: dict[str, Any] = {}
    if cold_repeats > 0:
        import tempfile

        from .cold_query import cold_search_benchmark

        say(f"cold vqret search, ONNX vs torch text path, {cold_repeats} runs each")
        with tempfile.TemporaryDirectory(prefix="vqret-bench-cold-") as tmp:
            cold = cold_search_benchmark(
                embedder, paths[:batch_size], tmp, repeats=cold_repeats,
                texts=[f"{TEXT_QUERY} number {i}" for i in range(TEXT_CALLS)], log=say,
            )

    # The baseline builds its own model from the registered name (a config file registers
    # under its stem). Free vqret's model first: two ViT copies would only add memory pressure.
    name, torch_device = embedder.name, embedder.device
    embedder_precision = embedder.precision
    del embedder
    say("plain loop: loading model, warm-up batch, then timed pass")
    base = _time_plain_loop(name, torch_device, paths, batch_size)
    say(f"plain loop: {base}")
    ratio = vqret.rate / base.rate
    say(f"ratio vqret / plain loop: {ratio:.2f}; vqret at {vqret.rate / roof_rate:.0%} of the roof")

    return {
        "device": str(torch_device),
        "model": model,
        "pretrained": pretrained,
        "batch_size": batch_size,
        "workers": n_workers,
        "n_images": len(paths),
        "upscaled_megapixels": upscale_megapixels,
        "image_megabytes": round(nbytes / 1e6, 2),
        "decode_failures": vqret.failures,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "matmul_fp32_gflops": round(gflops, 1),
        "precision": embedder_precision,
        "matmul_roof_gflops": round(roof_gflops, 1),
        "model_gflop_per_image": round(image_gflop, 3),
        "roof_images_per_s": round(roof_rate, 2),
        "share_of_roof": round(vqret.rate / roof_rate, 3),
        "vqret_images_per_s": round(vqret.rate, 2),
        "vqret_seconds": round(vqret.seconds, 3),
        "baseline_images_per_s": round(base.rate, 2),
        "baseline_seconds": round(base.seconds, 3),
        "ratio_vs_plain_loop": round(ratio, 3),
        # CPU seconds per image of the timed pass, decode workers included: what each path
        # costs in compute, which contention skews less than wall-clock time does.
        "vqret_cpu_s_per_image": vqret.cpu_per_image,
        "baseline_cpu_s_per_image": base.cpu_per_image,
        "text_query_ms_p50": round(statistics.median(text_ms), 2),
        "text_query_ms_min": round(min(text_ms), 2),
        "text_query_ms_max": round(max(text_ms), 2),
        # CPU used by *other* processes during each measurement, in % of all cores (None where
        # unknown): on a shared machine anything above a few % makes that number unreliable.
        "other_cpu_pct_matmul": matmul_watch.other_pct,
        "other_cpu_pct_vqret": vqret.watch.other_pct,
        "other_cpu_pct_baseline": base.watch.other_pct,
        "other_cpu_pct_text": text_watch.other_pct,
        **cold,
        # The unrounded measurements the rounded figures above are computed from, so that a
        # ratio can be checked against its inputs without the rounding in between (with a
        # tiny model, share_of_roof is ~0.03: 3 decimals are a 2% error).
        "raw": {
            "matmul_fp32_gflops": gflops,
            "matmul_roof_gflops": roof_gflops,
            "model_gflop_per_image": image_gflop,
            "vqret_images": vqret.images,
            "vqret_seconds": vqret.seconds,
            "baseline_images": base.images,
            "baseline_seconds": base.seconds,
        },
    }


def matmul_gflops(
    device: str = "cpu",
    size: int = MATMUL_SIZE,
    seconds: float = MATMUL_SECONDS,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Sustained torch.mm GFLOP/s on `device` in `dtype`: the compute roof for a roofline."""
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dev, dtype)
    b = torch.randn(size, size, generator=gen).to(dev, dtype)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: first call picks kernels and faults pages in
    _sync(dev)
    calls = 0
    start = time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        calls += 1
        _sync(dev)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return 2 * size**3 * calls / elapsed / 1e9


UPSCALE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqret" / "bench"


def upscaled_copies(
    paths: Sequence[str], root: Path, megapixels: float, cache: Path = UPSCALE_CACHE
) -> list[str]:
    """JPEG copies of `paths` enlarged (bicubic, aspect kept) to about `megapixels` each,
    made once under `cache` and reused: the decode cost of camera photos, from any folder."""
    from PIL import Image

    if not 0 < megapixels <= 100:
        raise ValueError(f"upscale must be in (0, 100] megapixels, got {megapixels}")
    out_dir = cache / f"{root.resolve().name}-{megapixels:g}mp"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = out_dir / (Path(path).relative_to(root).as_posix().replace("/", "__") + ".jpg")
        if not target.exists():
            with Image.open(path) as im:
                im = im.convert("RGB")
                scale = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
                size = (round(im.width * scale), round(im.height * scale))
                tmp = target.with_suffix(".tmp")
                im.resize(size, Image.Resampling.BICUBIC).save(tmp, "JPEG", quality=90)
                os.replace(tmp, target)  # a half-written file is never taken for a copy
        out.append(str(target))
    return out


def model_gflop_per_image(embedder: Embedder) -> float:
    """GFLOP of one `encode_image` call on one image, counted by torch's FlopCounterMode
    (matmuls and convolutions: what the roof bounds; norms and softmax are left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = next(embedder.model.parameters()).dtype
    pixels = torch.zeros(1, 3, embedder.image_size, embedder.image_size, dtype=dtype)
    counter = FlopCounterMode(display=False)
    # nn.MultiheadAttention's inference fast path is one fused op the counter can't see
    # into (it would miss the attention projections): count on the unfused path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            embedder.model.encode_image(pixels.to(embedder.device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 1e9


@dataclass
class Timing:
    """One timed pass over the files."""

    images: int
    seconds: float
    watch: CpuWatch
    failures: int = 0

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_per_image(self) -> float | None:
        own = self.watch.own_seconds
        return None if own is None or not self.images else round(own / self.images, 4)

    def __str__(self) -> str:
        return (
            f"{self.images} images in {self.seconds:.2f} s = {self.rate:.1f} images/s"
            f"{self.watch.note()}"
        )


def _time_vqret(embedder: Embedder, paths: Sequence[str]) -> Timing:
    """One `iter_image_files` pass, after a one-batch warm-up pass."""
    for _ in embedder.iter_image_files(paths[: embedder.batch_size]):
        pass  # warm-up: first forward pass allocates and picks kernels
    done = failures = 0
    with CpuWatch() as watch:
        start = time.perf_counter()
        for batch in embedder.iter_image_files(paths):
            done += len(batch.indices)
            failures += len(batch.failures)
        # encode_pixels returns numpy arrays, so the device work is finished at this point.
        seconds = time.perf_counter() - start
    return Timing(done, seconds, watch, failures)


def _time_plain_loop(
    name: str, device: torch.device, paths: Sequence[str], batch_size: int
) -> Timing:
    """The loop a user writes with open_clip alone: single process, no workers."""
    import open_clip
    from PIL import Image

    # Seeded like Embedder does for random weights, so both run the same numbers.
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model = model.to(device).eval()

    def encode(chunk: Sequence[str]) -> int:
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in chunk])
        with torch.no_grad():
            # .cpu() is where a user gets the vectors out; on CUDA it also waits for the GPU.
            return len(model.encode_image(pixels.to(device)).cpu())

    encode(paths[:batch_size])  # warm-up batch, as for vqret
    done = 0
    with CpuWatch() as watch:
        start = time.perf_counter()
        for i in range(0, len(paths), batch_size):
            done += encode(paths[i : i + batch_size])
        seconds = time.perf_counter() - start
    return Timing(done, seconds, watch)


def _text_latency_ms(embedder: Embedder) -> list[float]:
    """Milliseconds per warm single-query `embed_texts` call (tokenize + encode + normalise)."""
    for _ in range(TEXT_WARMUP):
        embedder.embed_texts([TEXT_QUERY])
    times = []
    for _ in range(TEXT_CALLS):
        start = time.perf_counter()
        embedder.embed_texts([TEXT_QUERY])
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuWatch:
    """Measures how much CPU other processes took while a `with` block ran (Linux only).

    Machine-wide busy time comes from /proc/stat; this process's own time, and its reaped
    children's (DataLoader workers are joined when their iterator ends), from getrusage.
    The difference is everyone else. `other_pct` is None where either is unavailable.
    """

    def __init__(self) -> None:
        self.other_pct: float | None = None
        self.own_seconds: float | None = None  # CPU time of this process and its workers

    def __enter__(self) -> CpuWatch:
        self._start = (_machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, own0, t0 = self._start
        busy1, own1 = _machine_busy_seconds(), _own_cpu_seconds()
        wall = time.perf_counter() - t0
        if busy0 is None or own0 is None or busy1 is None or own1 is None or wall <= 0:
            return
        self.own_seconds = own1 - own0
        other = (busy1 - busy0) - self.own_seconds
        capacity = wall * (os.cpu_count() or 1)
        # /proc/stat ticks at 100 Hz, so small negative values are rounding: clamp them.
        self.other_pct = round(max(0.0, 100 * other / capacity), 1)

    def note(self) -> str:
        if self.other_pct is None or self.other_pct < 5:
            return ""
        return f" [other processes used {self.other_pct:.0f}% of the CPU: unreliable]"


def _machine_busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal; guest time is already inside user.
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
