"""One progress bar for the commands that go through images: done/total, images/s, ETA."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

ProgressCallback = Callable[[int, int], None]  # (done, total)


@contextmanager
def images_progress(label: str, console: Console) -> Iterator[ProgressCallback]:
    """A transient bar on `console`; yields the `on_progress(done, total)` to report to."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} images/s"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    started = time.perf_counter()
    with progress:
        task = progress.add_task(label, total=None, rate="-")

        def on_progress(done: int, total: int) -> None:
            elapsed = time.perf_counter() - started
            rate = f"{done / elapsed:.1f}" if done and elapsed > 0 else "-"
            progress.update(task, completed=done, total=total, rate=rate)

        yield on_progress
