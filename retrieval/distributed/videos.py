"""Videos on a Ray cluster: one video per task of an actor pool, its frames embedded there.

    (position, path) rows, one a block -> map_batches(_VideoWorker, batch_size=1, actor
        pool: model loaded once per actor) -> a row per segment -> grouped on the driver

An actor samples its video (retrieval/video.py: keyframes, gaps, scene changes), embeds the
frames with its model and merges them into segments, so only the segments (a few vectors a
minute of video) travel back, never a frame. A video that fails comes back as one row whose
`error` says why, as the local engine would report it. The driver commits each video as its
rows are all in (video_index.py), in the order they finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..embedder import Embedder, ModelSpec
from ..video import EmbeddedVideo, Segment, VideoError, VideoInfo, embed_video
from .cluster import results


class _VideoWorker:
    """One actor: loads the model once, then samples and embeds one video per call."""

    config: dict[str, Any] = {}

    def __init__(self) -> None:
        import torch

        cfg = self.config
        torch.set_num_threads(max(1, int(cfg["num_cpus"])))
        self.embedder = Embedder.from_spec(
            ModelSpec.from_dict(cfg["spec"]), device=cfg["device"],
            batch_size=cfg["batch_size"], num_workers=0, precision=cfg["precision"],
        )
        self.every = float(cfg["every"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        for position, path in zip(batch["position"], batch["path"], strict=True):
            try:
                video = embed_video(self.embedder, str(path), self.every)
            except VideoError as e:
                rows.append({"position": int(position), "error": e.cause})
                continue
            for s in video.segments:
                rows.append({"position": int(position), "error": "", "t": s.t,
                             "start": s.start, "end": s.end, "embedding": s.embedding,
                             "frames": s.frames, "samples": video.samples,
                             "segments": len(video.segments),
                             "duration": video.info.duration, "width": video.info.width,
                             "height": video.info.height, "codec": video.info.codec})
        dim = self.embedder.embed_dim
        return {
            "position": np.asarray([r["position"] for r in rows], np.int64),
            "error": np.asarray([r["error"] for r in rows], dtype=object),
            "t": np.asarray([r.get("t", 0.0) for r in rows], np.float64),
            "start": np.asarray([r.get("start", 0.0) for r in rows], np.float64),
            "end": np.asarray([r.get("end", 0.0) for r in rows], np.float64),
            "embedding": np.stack([r.get("embedding", np.zeros(dim, np.float32))
                                   for r in rows]).astype(np.float32),  # (S, D)
            "frames": np.asarray([r.get("frames", 0) for r in rows], np.int64),
            "samples": np.asarray([r.get("samples", 0) for r in rows], np.int64),
            "segments": np.asarray([r.get("segments", 1) for r in rows], np.int64),
            "duration": np.asarray([r.get("duration", 0.0) for r in rows], np.float64),
            "width": np.asarray([r.get("width", 0) for r in rows], np.int64),
            "height": np.asarray([r.get("height", 0) for r in rows], np.int64),
            "codec": np.asarray([r.get("codec", "") for r in rows], dtype=object),
        }


def embed_videos_on_ray(
    embedder: Any, names: Sequence[str], every: float,
    on_frames: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, EmbeddedVideo | VideoError]]:
    """(index into names, the embedded video or its VideoError), as videos finish."""
    if not len(names):
        return
    ray = embedder._connect()
    plan = embedder._plan(len(names) * embedder.batch_size)  # an actor per video at most
    config = {"spec": embedder.spec.to_dict(), "device": plan["device"],
              "batch_size": embedder.batch_size, "precision": embedder.precision,
              "num_cpus": plan["num_cpus"], "every": every}
    worker = type("_VideoWorker", (_VideoWorker,), {"config": config})
    items = [{"position": i, "path": str(p)} for i, p in enumerate(names)]
    # one video a block: a long video must not hold up the short ones queued behind it
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        worker, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(plan["actors"], len(items))),
        num_gpus=plan["num_gpus"], num_cpus=plan["num_cpus"],
    )
    pending: dict[int, list[tuple[Segment, int, dict]]] = {}
    for out in results(dataset, "a video actor"):
        for k in range(len(out["position"])):
            i = int(out["position"][k])
            if out["error"][k]:
                yield i, VideoError(str(out["error"][k]))
                continue
            segment = Segment(float(out["start"][k]), float(out["end"][k]), float(out["t"][k]),
                              out["embedding"][k], int(out["frames"][k]))
            facts = {name: out[name][k] for name in ("samples", "duration", "width", "height",
                                                     "codec")}
            got = pending.setdefault(i, [])
            got.append((segment, int(out["segments"][k]), facts))
            if len(got) == got[0][1]:  # all of this video's rows are in
                del pending[i]
                info = VideoInfo(float(facts["duration"]), int(facts["width"]),
                                 int(facts["height"]), str(facts["codec"]))
                segments = sorted((s for s, _, _ in got), key=lambda s: s.start)
                if on_frames:
                    on_frames(int(facts["samples"]))
                yield i, EmbeddedVideo(info, segments, int(facts["samples"]))
