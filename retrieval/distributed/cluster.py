"""The Ray cluster: joining or starting it, what it has, Ray Data in and out, and one line
(not Ray's remote traceback or minutes of retries) when the cluster, not a file, is the problem.

Ray is an optional extra (`pip install 'vqret[ray]'`): nothing here imports it at module
level, so the CLI can import this module to say how to install it.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..one_line import first_line

INSTALL_HINT = "pip install 'vqret[ray]'"


class RayUnavailableError(RuntimeError):
    """`--engine ray` was asked for, but ray (with Ray Data) isn't installed."""


def require_ray() -> Any:
    """The `ray` module with Ray Data, or RayUnavailableError with the one-line install hint."""
    try:
        import ray
        import ray.data  # noqa: F401 - `ray` without the [data] extra lacks it
    except ImportError:
        raise RayUnavailableError(
            f"--engine ray needs Ray with Ray Data: {INSTALL_HINT}"
        ) from None
    return ray


class RayWorkerError(ValueError):
    """A Ray actor or task failed as a whole (not one file): its cause in one line."""


class ClusterUnreachableError(ValueError):
    """`--address` names no Ray cluster that answers (a ValueError: the CLI's one line)."""


# --------------------------------------------------------------------------------------------
# Joining, starting, resources
# --------------------------------------------------------------------------------------------


def connect(address: str | None = None) -> bool:
    """Join the Ray cluster at `address` ("auto", "HOST:6379", "ray://HOST:10001"), or start
    a local one.

    Returns True when this call started Ray (so the caller may shut it down). An already
    initialised Ray (a test, a notebook, a Ray job's driver) is used as it is.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    _check_reachable(address)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            # The workers' output stays in their logs (/tmp/ray/session_latest/logs on each
            # node): forwarded, a failing actor's remote traceback would bury the one-line
            # error the run ends with.
            log_to_driver=False,
        )
    except ConnectionError as e:  # "auto" with no cluster running on this machine
        raise ClusterUnreachableError(f"Ray cluster {address}: {first_line(e)}") from None
    return True


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds, in one line, when nothing listens at HOST:PORT: Ray itself retries
    an unreachable GCS for minutes, logging a warning every few seconds."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachableError(
            f"Ray cluster {address}: expected auto, HOST:PORT or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        cause = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ClusterUnreachableError(
            f"Ray cluster {address}: nothing answers there ({cause}); start one with "
            "`ray start --head`, or leave --address out to start Ray on this machine"
        ) from None


def cluster_resources() -> tuple[int, int]:
    """(GPUs, CPUs) of the connected cluster, at least one CPU."""
    resources = require_ray().cluster_resources()
    return int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))


# --------------------------------------------------------------------------------------------
# Ray Data: what goes in, what comes back, and quiet on the console
# --------------------------------------------------------------------------------------------


def path_blocks(paths: Sequence[str], rows: int) -> list[Any]:
    """`(position, path)` Arrow tables of `rows` rows each: what Ray Data hands out."""
    import pyarrow as pa

    return [
        pa.table(
            {
                "position": pa.array(range(start, min(start + rows, len(paths))), pa.int64()),
                "path": pa.array([str(p) for p in paths[start : start + rows]], pa.string()),
            }
        )
        for start in range(0, len(paths), rows)
    ]


def results(dataset: Any, what: str) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's output batches as they finish; a worker that fails as a whole (not one
    file) ends the run with its cause in one line, `what` naming the worker."""
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy",
                                        prefetch_batches=2))
    while True:
        try:
            out = next(batches, None)
        except Exception as e:
            raise _worker_failure(e, what) from e
        if out is None:
            return
        yield out


_ERROR_LINE = re.compile(r"^([\w.]*(?:Error|Exception)):\s*(.+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _worker_failure(error: Exception, what: str) -> Exception:
    """Ray's error for a dead actor or failed task is its whole remote traceback; keep the
    exception it ends with (e.g. `WeightsUnavailableError: weights file not found: ...`).
    Errors that aren't Ray's (Ray Data's user-code wrapper included) are left as they are."""
    if not type(error).__module__.startswith("ray"):
        return error
    lines = _ANSI.sub("", str(error)).splitlines()
    found = [m for m in map(_ERROR_LINE.match, (ln.strip() for ln in lines)) if m]
    cause = (f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2)}" if found
             else (lines[0] if lines else type(error).__name__))
    return RayWorkerError(
        f"{what} failed on Ray: {cause} (workers' logs: /tmp/ray/session_latest/logs)"
    )


class _NoRunChatter(logging.Filter):
    """Drops Ray Data's per-run INFO lines (plan, start, finish) and its note that progress
    bars are off: on stderr they would interleave with vqret's progress and summary. Its
    session log file (/tmp/ray/session_*/logs/ray-data) keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO and "Progress bars disabled" not in str(record.msg)


def quiet_ray_data() -> None:
    """No Ray Data progress bars or run chatter on the console: the caller shows its own."""
    ray = require_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler)
        if console and not any(isinstance(f, _NoRunChatter) for f in handler.filters):
            handler.addFilter(_NoRunChatter())


__all__ = [
    "INSTALL_HINT",
    "ClusterUnreachableError",
    "RayUnavailableError",
    "RayWorkerError",
    "cluster_resources",
    "connect",
    "path_blocks",
    "quiet_ray_data",
    "require_ray",
    "results",
]
