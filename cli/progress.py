"""One progress bar for the commands that go through images: done/total, images/s, ETA; and
beside it, for `vqret index`, a line for the videos' sampled frames."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

ProgressCallback = Callable[[int, int], None]  # (done, total)
FramesCallback = Callable[[int], None]  # (frames embedded since the last call)


@contextmanager
def images_progress(label: str, console: Console) -> Iterator[ProgressCallback]:
    """A transient bar on `console`; yields the `on_progress(done, total)` to report to."""
    with index_progress(label, console) as (on_progress, _):
        yield on_progress


@contextmanager
def index_progress(
    label: str, console: Console
) -> Iterator[tuple[ProgressCallback, FramesCallback]]:
    """The images' bar, and a line for video frames that appears with the first frame (how
    many a video gives is known only once it is sampled, so it has no total or ETA); yields
    `(on_progress(done, total), on_video_frames(n))`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} {task.fields[unit]}/s"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        images = _Rate(progress, progress.add_task(label, total=None, rate="-", unit="images"))
        frames: list[_Rate] = []  # the video line, once a frame is embedded

        def on_progress(done: int, total: int) -> None:
            images.update(done, total)

        def on_video_frames(n: int) -> None:
            if not frames:
                task = progress.add_task(f"{label} video frames", total=None, rate="-",
                                         unit="frames")
                frames.append(_Rate(progress, task))
            frames[0].update(frames[0].done + n, None)

        yield on_progress, on_video_frames


class _Rate:
    """One task of the bar: its count and the rate since it started."""

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task
        self.started = time.perf_counter()
        self.done = 0

    def update(self, done: int, total: int | None) -> None:
        self.done = done
        elapsed = time.perf_counter() - self.started
        rate = f"{done / elapsed:.1f}" if done and elapsed > 0 else "-"
        self.progress.update(self.task, completed=done, total=total, rate=rate)
