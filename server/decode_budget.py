"""One budget of query-image pixels being decoded at once, for the whole server process.

A small file can hold a huge picture: a 6 KB 1-bit PNG of 7000 x 7000 decodes into ~100 MB
(its pixels, then the grey copy they are averaged in). Requests decode in parallel threads,
so without a budget 50 such uploads would need ~5-10 GB at once. Every query image takes its
decoded pixel count from here before it is decoded (after a JPEG's draft scaling) and gives
it back once it is reduced to the model's scale; a request that can't get its share in time
is answered 503 with Retry-After rather than pushing the process into swap or the OOM killer.

    budget = PixelBudget(pixels=200_000_000, wait_s=10)
    gate = budget.gate(deadline=time.monotonic() + budget.wait_s)
    load_image(data, gate=gate, ...)          # images.load_image enters gate(pixels)
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from .inputs import RequestError

# Decoding holds up to ~4 bytes per pixel (Pillow keeps RGB as 32-bit), 2 for a 1-bit or grey
# image and its averaged copy: the default budget spends 1/32 of RAM at 4 B/pixel, between the
# largest query image accepted (so one always fits) and 250 MP (1 GB at 4 B/pixel).
BYTES_PER_PIXEL = 4
RAM_SHARE = 1 / 32
MIN_BUDGET_MP = 50
MAX_DEFAULT_BUDGET_MP = 250
DEFAULT_WAIT_S = 10.0


def default_budget_mp() -> int:
    """The default --decode-budget-mp: sized from this machine's RAM (module docstring)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 8 GB
        ram = 8 << 30
    mp = int(ram * RAM_SHARE / BYTES_PER_PIXEL / 1e6)
    return max(MIN_BUDGET_MP, min(MAX_DEFAULT_BUDGET_MP, mp))


class PixelBudget:
    """A counting semaphore of pixels, shared by every request thread of the process.

    An image larger than the whole budget is charged the whole budget: it waits until nothing
    else is decoding, then decodes alone (the per-image pixel cap bounds it anyway).
    """

    def __init__(self, pixels: int, wait_s: float = DEFAULT_WAIT_S):
        if pixels < 1:
            raise ValueError("the decode budget must be at least 1 pixel")
        if wait_s < 0:
            raise ValueError("the decode wait must be >= 0 s")
        self.total = int(pixels)
        self.wait_s = float(wait_s)
        self._in_use = 0
        self._peak = 0
        self._waiting = 0
        self._refused = 0
        self._cond = threading.Condition()

    def gate(self, deadline: float | None = None) -> Callable[[int], AbstractContextManager[Any]]:
        """gate(pixels) for images.load_image: waits until `deadline` (time.monotonic();
        default wait_s from now) at most, then raises a 503 RequestError with Retry-After."""
        if deadline is None:
            deadline = time.monotonic() + self.wait_s
        return lambda pixels: self.hold(pixels, deadline)

    @contextmanager
    def hold(self, pixels: int, deadline: float) -> Iterator[None]:
        cost = max(0, min(int(pixels), self.total))
        with self._cond:
            self._waiting += 1
            try:
                while self._in_use + cost > self.total:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._refused += 1
                        raise self._busy(pixels)
                    self._cond.wait(left)
            finally:
                self._waiting -= 1
            self._in_use += cost
            self._peak = max(self._peak, self._in_use)
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= cost
                self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        """For /healthz: the budget, what is decoding now, the most at once, the refusals."""
        with self._cond:
            return {
                "budget_mp": round(self.total / 1e6, 1),
                "in_flight_mp": round(self._in_use / 1e6, 1),
                "peak_mp": round(self._peak / 1e6, 1),
                "waiting": self._waiting,
                "refused": self._refused,
                "wait_s": self.wait_s,
            }

    def _busy(self, pixels: int) -> RequestError:
        retry = max(1, math.ceil(self.wait_s / 2))
        return RequestError(
            503,
            f"the server is decoding too many image pixels at once ({self.total / 1e6:g} MP "
            f"budget) to take this {pixels / 1e6:.1f} MP image within {self.wait_s:g} s: "
            f"retry in {retry} s",
            {"Retry-After": str(retry)},
        )
