"""Indexing a video: its moments sampled, decoded and embedded, against decoding every frame.

The benchmark makes its own video: `seconds` of 1080p H.264 (libx264, yuv420p) at `fps`, a
keyframe every `gop` seconds (phones and streaming encodes use 1-2 s) plus the encoder's own
at scene cuts, and a new scene every ~7 s: a coloured field with a shape that moves, so the
predicted frames carry real motion. Then, in the same run on the same file:

- vqret's path (retrieval/video.py `embed_video`): keyframes decoded alone, the gaps longer
  than `every` filled by seeking, one sample at least every `every` seconds and at scene
  changes, embedded in batches while the next ones decode, merged into segments.
- the naive loop: decode every frame, keep one every `every` seconds, embed it (the same
  model, batch and preprocessing). It runs on the first `baseline_seconds` only and is
  extrapolated per video-second (its cost is linear in the frames decoded).

Reported: video-seconds indexed per wall-second ("x real time") and frames embedded per
second for both, and vqret's decode alone (no model) against decoding every frame.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

Log = Callable[[str], Any]
SCENE_SECONDS = 7.0


def write_video(path: Path, frames: Iterable[np.ndarray], *, fps: int, width: int,
                height: int, codec: str = "libx264", gop: int | None = None,
                codec_options: dict[str, str] | None = None,
                container_options: dict[str, str] | None = None) -> Path:
    """Encode `frames` (height x width x 3 uint8 RGB, one per 1/fps s) into `path`, yuv420p;
    `gop`: frames between keyframes, the encoder's default when None. The one PyAV writer of
    the benchmarks and the test fixtures."""
    import av

    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        if gop is not None:
            stream.codec_context.gop_size = gop
        if codec_options:
            stream.options = codec_options
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_video(path: Path, seconds: float, *, fps: int = 30, width: int = 1920,
               height: int = 1080, gop: float = 1.0, seed: int = 0) -> Path:
    """Write the benchmark's H.264 video (module docstring)."""
    import av

    rng = np.random.default_rng(seed)
    n_scenes = max(1, int(np.ceil(seconds / SCENE_SECONDS)))
    # each scene: a smooth colour field twice the frame's size, panned across the frame
    small = rng.integers(0, 256, size=(n_scenes, 9, 16, 3)).astype(np.uint8)

    def frames() -> Iterator[np.ndarray]:
        scene, scene_frames = -1, None
        for i in range(round(seconds * fps)):
            k = min(n_scenes - 1, int(i / fps / SCENE_SECONDS))
            if k != scene:
                scene = k
                field = av.VideoFrame.from_ndarray(small[k], format="rgb24")
                scene_frames = field.reformat(width=2 * width, height=2 * height,
                                              format="rgb24").to_ndarray()
                cy, cx = height // 2, width // 2
                yy, xx = np.ogrid[:2 * height, :2 * width]
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (height // 4) ** 2
                scene_frames[disc] = 255 - small[k, 0, 0]
            step = i - round(k * SCENE_SECONDS * fps)
            dy, dx = (3 * step) % height, (5 * step) % width
            yield scene_frames[dy:dy + height, dx:dx + width]

    return write_video(path, frames(), fps=fps, width=width, height=height,
                       gop=max(1, round(gop * fps)),
                       codec_options={"preset": "ultrafast", "crf": "23"})


def naive_loop(embedder: Any, path: Path, seconds: float, every: float) -> dict[str, float]:
    """Decode every frame of the first `seconds`, embed one every `every` s: (wall s,
    frames decoded, frames embedded)."""
    import av
    import torch

    started = time.perf_counter()
    decoded = embedded = 0
    batch: list[Any] = []
    next_t = 0.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            t = float(frame.time)
            if t >= seconds:
                break
            decoded += 1
            if t + 1e-6 >= next_t:
                next_t += every
                # the size vqret's sampler hands the model (shorter side = its input)
                scale = embedder.image_size / min(frame.width, frame.height)
                image = frame.to_image(width=round(frame.width * scale),
                                       height=round(frame.height * scale))
                batch.append(embedder.preprocess(image))
                if len(batch) >= 32:
                    embedder.encode_pixels(torch.stack(batch))
                    embedded += len(batch)
                    batch = []
    if batch:
        embedder.encode_pixels(torch.stack(batch))
        embedded += len(batch)
    return {"wall_s": time.perf_counter() - started, "decoded": decoded, "embedded": embedded}


def decode_every_frame(path: Path, seconds: float) -> tuple[float, int]:
    """(wall s, frames) to decode every frame of the first `seconds`, nothing else."""
    import av

    started = time.perf_counter()
    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if frame.time >= seconds:
                break
            n += 1
    return time.perf_counter() - started, n


def run_video_benchmark(
    seconds: float = 120.0, *, fps: int = 30, width: int = 1920, height: int = 1080,
    gop: float = 1.0, every: float = 2.0,
    baseline_seconds: float = 20.0, model: str = "ViT-B-32", pretrained: str = "none",
    precision: str = "auto", batch_size: int = 32, log: Log | None = None,
) -> dict[str, Any]:
    from vqret.retrieval.embedder import Embedder
    from vqret.retrieval.video import embed_video, sample_frames

    log = log or (lambda _m: None)
    baseline_seconds = min(baseline_seconds, seconds)
    embedder = Embedder(model, pretrained, device="cpu", precision=precision,
                        batch_size=batch_size, num_workers=0)
    with tempfile.TemporaryDirectory(prefix="vqret-bench-video-") as tmp:
        path = Path(tmp) / "bench.mp4"
        log(f"encoding {seconds:g} s of {width}x{height} {fps} fps H.264 (keyframe every "
            f"{gop:g} s)...")
        started = time.perf_counter()
        make_video(path, seconds, fps=fps, width=width, height=height, gop=gop)
        made = time.perf_counter() - started
        log(f"  {made:.1f} s, {path.stat().st_size / 1e6:.1f} MB")

        # warm the model (first calls allocate) on one throwaway batch
        import torch

        embedder.encode_pixels(torch.zeros(2, 3, embedder.image_size, embedder.image_size))

        log("vqret: keyframes + gaps, embedded...")
        started = time.perf_counter()
        video = embed_video(embedder, str(path), every)
        ours = time.perf_counter() - started
        log("vqret: sampling alone (no model)...")
        started = time.perf_counter()
        _, samples = sample_frames(str(path), every, size=embedder.image_size)
        n_sampled = sum(1 for _ in samples)
        ours_decode = time.perf_counter() - started

        log(f"naive: every frame of the first {baseline_seconds:g} s...")
        naive = naive_loop(embedder, path, baseline_seconds, every)
        full_decode, n_decoded = decode_every_frame(path, baseline_seconds)

    duration = video.info.duration
    naive_per_video_s = naive["wall_s"] / baseline_seconds
    result = {
        "video": f"{video.info.width}x{video.info.height} {video.info.codec} {fps} fps, "
                 f"{duration:g} s, keyframe every {gop:g} s",
        "model": f"{model} ({pretrained}), {embedder.precision}",
        "every_s": every,
        "frames_embedded": video.samples,
        "segments": len(video.segments),
        "wall_s": round(ours, 2),
        "x_real_time": round(duration / ours, 1),
        "frames_embedded_per_s": round(video.samples / ours, 1),
        "naive_baseline_seconds": baseline_seconds,
        "naive_frames_decoded": naive["decoded"],
        "naive_x_real_time": round(1 / naive_per_video_s, 2),
        "naive_frames_embedded_per_s": round(naive["embedded"] / naive["wall_s"], 1),
        "speedup_vs_naive": round((duration / ours) * naive_per_video_s, 1),
        "decode_only_x_real_time": round(duration / ours_decode, 1),
        "decode_every_frame_x_real_time": round(baseline_seconds / full_decode, 2),
        "decode_speedup": round((duration / ours_decode) / (baseline_seconds / full_decode), 1),
        "frames_sampled": n_sampled,
        "frames_in_baseline_decode": n_decoded,
        "encode_s": round(made, 1),
    }
    return result
