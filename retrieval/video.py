"""Frames out of a video, and the moments they make: sampling, embedding, segments.

A video is opened with PyAV (its wheel carries the FFmpeg libraries: no system ffmpeg) and
never decoded frame by frame:

1. Keyframes only (`skip_frame = "NONKEY"`): the decoder skips every predicted frame, so an
   hour of 4K costs its few thousand intra frames. A keyframe is a sample when it is
   `every` seconds past the last sample, or when it is a scene change: its colour histogram
   (64 bins of a 32x32 thumbnail) far from the last sample's, a cheap test that a pan or a
   moving subject doesn't trip and a cut does (encoders put a keyframe at a hard cut: x264,
   x265 and libvpx all have scene-cut detection on by default).
2. Where keyframes are further apart than `every` (a long GOP), the gap is filled: one seek
   to the keyframe before it (`container.seek(..., backward=True, any_frame=False)`), then
   decoding forward to each sample time in the gap.

Each sample is embedded (the embedder's own preprocess and batch path), and consecutive
samples whose embeddings are near-identical (cosine >= MERGE_COSINE) merge into one segment
[start, end): start is its first sample's time, end the next segment's start (the video's
duration for the last). A segment is one row of the image table: its embedding is the
normalised mean of its samples', its `t` the time of the sample nearest that mean (the
frame shown), so a static shot of an hour is one result, not 1800 near-identical ones.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .one_line import first_line

__all__ = [
    "DEFAULT_EVERY",
    "MERGE_COSINE",
    "VIDEO_EXTENSIONS",
    "Sample",
    "Segment",
    "VideoError",
    "VideoInfo",
    "embed_video",
    "frame_at",
    "merge_segments",
    "sample_frames",
]

VIDEO_EXTENSIONS: frozenset[str] = frozenset([".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"])
DEFAULT_EVERY = 2.0  # seconds: at least one sample this often
MERGE_COSINE = 0.95  # consecutive samples at least this similar are one segment
# Histogram distance (half the L1 of two 64-bin colour histograms, 0..1) above which a
# keyframe is a new scene: measured on the benchmark's video, a fast pan is 0.10-0.18 from
# one keyframe to the next and a cut 0.44; the tests' cuts between drawn shapes are ~0.38.
SCENE_DIFFERENCE = 0.3
_DIFF_SIDE = 32
# A video whose frames stop this much before the duration its container states is reported
# as truncated, not indexed as if it were shorter.
_TRUNCATED_FRACTION = 0.9
_BATCH = 32  # samples embedded at a time


class VideoError(Exception):
    """A video that can't be indexed: `cause` is one line (broken, truncated, codec...)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    width: int
    height: int
    codec: str


@dataclass
class Sample:
    t: float  # seconds from the video's start
    image: Any  # PIL RGB image, its shorter side about `size` px


@dataclass
class Segment:
    start: float
    end: float
    t: float  # the representative frame's time
    embedding: np.ndarray  # (D,) unit vector
    frames: int  # samples merged


@dataclass
class EmbeddedVideo:
    info: VideoInfo
    segments: list[Segment] = field(default_factory=list)
    samples: int = 0  # frames embedded


# --------------------------------------------------------------------------------------------
# Opening and sampling
# --------------------------------------------------------------------------------------------


def _av():
    # ~0.1 s, and only a run that finds a video needs it. FFmpeg's logging stays as PyAV
    # leaves it, off: a Python log callback deadlocks when a decoder's frame threads log
    # while the codec is freed under the GIL.
    import av

    return av


def _open(path: str) -> tuple[Any, Any]:
    av = _av()
    try:
        container = av.open(path, mode="r", metadata_errors="ignore")
    except av.FFmpegError as e:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise VideoError("empty file (0 bytes)") from None
        # an mp4 cut short before its index (written last by most muxers) reads as garbage
        raise VideoError(f"truncated, or not a video: {_cause(e)}") from None
    except OSError as e:
        raise VideoError(first_line(e.strerror or e)) from None
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise VideoError(f"unknown codec {stream.codec_tag or stream.name!r}")
    stream.thread_type = "AUTO"  # frame and slice threads: FFmpeg's, not the GIL's
    return container, stream


def _cause(e: Exception) -> str:
    return first_line(getattr(e, "strerror", None) or e)


def _info(container: Any, stream: Any) -> VideoInfo:
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    ctx = stream.codec_context
    return VideoInfo(float(duration or 0.0), int(ctx.width or 0), int(ctx.height or 0),
                     str(ctx.name))


def _start(stream: Any) -> float:
    """The first frame's presentation time: sample times count from it (as players do)."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _time(frame: Any, start: float) -> float | None:
    t = frame.time
    return None if t is None else max(0.0, float(t) - start)


def _small_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The frame's size with its shorter side `size` (never upscaled), even numbers."""
    scale = min(1.0, size / max(1, min(width, height)))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _histogram(frame: Any) -> np.ndarray:
    """(64,) colour histogram of the frame (4 levels per channel), summing to 1."""
    small = frame.reformat(width=_DIFF_SIDE, height=_DIFF_SIDE, format="rgb24").to_ndarray()
    levels = small // 64
    bins = levels[..., 0].astype(np.int64) * 16 + levels[..., 1] * 4 + levels[..., 2]
    return np.bincount(bins.ravel(), minlength=64) / bins.size


def sample_frames(
    path: str, every: float = DEFAULT_EVERY, *, size: int = 224,
    scene_difference: float = SCENE_DIFFERENCE,
) -> tuple[VideoInfo, Iterator[Sample]]:
    """(the video's facts, its samples in time order): keyframes at least `every` s apart
    or at a scene change, and frames decoded in gaps between keyframes longer than that.
    Opening failures raise VideoError now; decoding failures when iterated."""
    if not every > 0:
        raise ValueError(f"every must be a positive number of seconds, not {every!r}")
    container, stream = _open(path)
    info = _info(container, stream)
    return info, _samples(container, stream, info, every, size, scene_difference)


def _samples(container, stream, info, every, size, scene_difference) -> Iterator[Sample]:
    av = _av()
    start = _start(stream)
    width, height = _small_size(info.width, info.height, size)
    # A keyframe this close to the grid counts as on it: keyframes of a 1 s GOP at
    # 0.97, 1.94... still give one sample every 2 s, not every 1 s.
    slack = 0.25 * every
    last_t: float | None = None
    last_histogram: np.ndarray | None = None
    held: tuple[float, Any] | None = None  # the last keyframe not sampled
    gaps: list[tuple[float, float]] = []  # (after, before): no keyframe in between
    seen_end = 0.0
    picked: list[Sample] = []

    def take(t: float, frame: Any) -> Sample:
        nonlocal last_t, last_histogram
        last_t, last_histogram = t, _histogram(frame)
        return Sample(t, frame.to_image(width=width, height=height))

    try:
        stream.codec_context.skip_frame = "NONKEY"
        for frame in container.decode(stream):
            t = _time(frame, start)
            if t is None:
                continue
            seen_end = max(seen_end, t)
            if last_t is None:
                yield take(t, frame)
                continue
            if t - last_t > every + slack and held is not None:
                yield take(*held)  # the keyframe before this one keeps the gap short
            held = None
            if t - last_t > every + slack:
                gaps.append((last_t, t))
            distance = float(np.abs(_histogram(frame) - last_histogram).sum()) / 2
            changed = distance > scene_difference
            if changed or t - last_t >= every - slack:
                yield take(t, frame)
            else:
                held = (t, frame)
        if last_t is None:
            raise VideoError("no frame could be decoded")
        # After the last keyframe: its GOP up to the end.
        end = max(info.duration, seen_end)
        if held is not None and end - last_t > every + slack:
            yield take(*held)
        if end - last_t > every + slack:
            gaps.append((last_t, end))
        stream.codec_context.skip_frame = "DEFAULT"
        for after, before in gaps:
            n = math.ceil((before - after) / every) - 1
            targets = [after + (before - after) * (i + 1) / (n + 1) for i in range(n)]
            got = _decode_at(container, stream, start, targets, width, height)
            picked.extend(got)
            seen_end = max([seen_end, *(s.t for s in got)])
        yield from picked
    except av.FFmpegError as e:
        raise VideoError(f"broken video: {_cause(e)}") from None
    except (MemoryError, OSError) as e:
        raise VideoError(f"broken video: {first_line(e)}") from None
    finally:
        container.close()
    if info.duration and seen_end < _TRUNCATED_FRACTION * info.duration - every:
        raise VideoError(f"truncated: frames end at {seen_end:.1f} s of {info.duration:.1f} s")


def _decode_at(container, stream, start, targets, width, height) -> list[Sample]:
    """Frames at (just past) each time of `targets` (sorted, one GOP's gap): one seek to the
    keyframe before the first, then forward."""
    if not targets:
        return []
    tb = stream.time_base
    container.seek(int((targets[0] + start) / tb), stream=stream, backward=True,
                   any_frame=False)
    out: list[Sample] = []
    i = 0
    for frame in container.decode(stream):
        t = _time(frame, start)
        if t is None:
            continue
        while i < len(targets) and t >= targets[i] - 1e-3:
            if not out or out[-1].t != t:
                out.append(Sample(t, frame.to_image(width=width, height=height)))
            i += 1
        if i >= len(targets):
            break
    return out


def frame_at(path: str, t: float, size: int = 256) -> Any:
    """The frame at `t` seconds (the first one at or after it), a PIL image whose longer side
    is at most `size`: what a result shows. Raises VideoError."""
    av = _av()
    container, stream = _open(path)
    try:
        info = _info(container, stream)
        scale = min(1.0, size / max(1, info.width, info.height))
        width = max(2, round(info.width * scale / 2) * 2)
        height = max(2, round(info.height * scale / 2) * 2)
        start = _start(stream)
        container.seek(int((t + start) / stream.time_base), stream=stream, backward=True,
                       any_frame=False)
        last = None
        for frame in container.decode(stream):
            ft = _time(frame, start)
            last = frame
            if ft is not None and ft >= t - 1e-3:
                break
        if last is None:
            raise VideoError(f"no frame at {t:.1f} s")
        return last.to_image(width=width, height=height)
    except av.FFmpegError as e:
        raise VideoError(f"broken video: {_cause(e)}") from None
    finally:
        container.close()


# --------------------------------------------------------------------------------------------
# Embedding and segments
# --------------------------------------------------------------------------------------------


def embed_video(
    embedder: Any, path: str, every: float = DEFAULT_EVERY, *,
    merge_cosine: float = MERGE_COSINE, on_frames: Callable[[int], None] | None = None,
) -> EmbeddedVideo:
    """Sample `path`, embed the samples in batches (decoding runs on a thread meanwhile:
    FFmpeg works outside the GIL) and merge them into segments. Raises VideoError."""
    import torch

    size = int(getattr(embedder, "image_size", 224))
    info, samples = sample_frames(path, every, size=size)
    frames: queue.Queue = queue.Queue(maxsize=2 * _BATCH)
    done = object()
    failure: list[BaseException] = []

    def decode() -> None:
        try:
            for s in samples:
                frames.put((s.t, embedder.preprocess(s.image)))
        except BaseException as e:  # noqa: BLE001 - handed to the embedding thread
            failure.append(e)
        finally:
            frames.put(done)

    worker = threading.Thread(target=decode, name="vqret-video-decode", daemon=True)
    worker.start()
    times: list[float] = []
    vectors: list[np.ndarray] = []
    batch: list[Any] = []

    def flush() -> None:
        if batch:
            vectors.append(embedder.encode_pixels(torch.stack(batch)))
            if on_frames:
                on_frames(len(batch))
            batch.clear()

    while (item := frames.get()) is not done:
        t, pixels = item
        times.append(t)
        batch.append(pixels)
        if len(batch) >= _BATCH:
            flush()
    flush()
    worker.join()
    if failure:
        raise failure[0]
    order = np.argsort(np.asarray(times), kind="stable")  # gap samples came after keyframes
    embeddings = np.concatenate(vectors)[order]
    ordered = [times[i] for i in order]
    end = max(info.duration, ordered[-1])
    return EmbeddedVideo(info, merge_segments(ordered, embeddings, end, merge_cosine),
                         len(ordered))


def merge_segments(times: list[float], embeddings: np.ndarray, end: float,
                   merge_cosine: float = MERGE_COSINE) -> list[Segment]:
    """Consecutive samples (sorted by time, unit (N, D) embeddings) with cosine >=
    `merge_cosine` to the one before become one Segment; the last ends at `end`."""
    groups: list[list[int]] = []
    for i in range(len(times)):
        if groups and float(embeddings[i] @ embeddings[i - 1]) >= merge_cosine:
            groups[-1].append(i)
        else:
            groups.append([i])
    segments = []
    for k, group in enumerate(groups):
        mean = embeddings[group].mean(axis=0)
        mean /= np.linalg.norm(mean) or 1.0
        best = group[int(np.argmax(embeddings[group] @ mean))]
        stop = times[groups[k + 1][0]] if k + 1 < len(groups) else max(end, times[group[-1]])
        segments.append(Segment(times[group[0]], stop, times[best], mean.astype(np.float32),
                                len(group)))
    return segments
