"""Fault injection for the tests, as SQLite tests its I/O errors: the Nth write, rename,
fsync or mkdir of an operation raises a chosen OSError.

    with Faults() as counting:          # count the calls one operation makes
        operation()
    for n in range(1, counting.calls + 1):
        with Faults(fail_at=n, error=errno.ENOSPC) as faults:
            operation()                   # raises at the nth call (or completes: see below)

What is patched is what vqret's writers reach the disk through: os.replace/os.rename
(rename), os.fsync (fsync), os.mkdir (mkdir; os.makedirs and Path.mkdir go through it), and
writes: open()/io.open() in a writing mode (Path.write_text/write_bytes, numpy, zipfile,
ONNX), os.open with O_CREAT/O_WRONLY/O_RDWR (the lock file), and the libraries that write
natively: pyarrow.parquet.write_table, faiss.write_index, torch.save, safetensors' save_file
and PIL's Image.save to a path. A native writer first writes its file, then raises: a half
written temp file left behind, as a real full disk leaves one.

The real os.fsync is not called (the test needs the call, not the durability). A failed
fsync of a folder is ignored by design (atomic.fsync_folder: the file is already
safe), so an operation may complete although its nth call failed; `raised` says whether
the fault reached the caller.
"""

from __future__ import annotations

import builtins
import errno as errno_module
import io
import os
from collections.abc import Callable
from typing import Any

KINDS = ("write", "rename", "fsync", "mkdir")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _writing_mode(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class Faults:
    """Count (fail_at None) or fail the `fail_at`-th call of the kinds asked for."""

    def __init__(self, fail_at: int | None = None, error: int = errno_module.ENOSPC,
                 kinds: tuple[str, ...] = KINDS,
                 after_rename: Callable[[str], None] | None = None,
                 only: Callable[[str], bool] | None = None, repeat: bool = False):
        """`after_rename(target)` is called after each rename that succeeded (its own calls
        are not counted): a test snapshots what a reader sees at every commit with it.
        `only(path)` limits the calls counted (and failed) to some paths (one writer's).
        `repeat`: every call from the `fail_at`-th on fails (a disk that stays full)."""
        self.repeat = repeat
        self.fail_at = fail_at
        self.only = only
        self.after_rename = after_rename
        self._paused = False
        self.errno = error
        self.kinds = kinds
        self.calls = 0
        self.log: list[tuple[str, str]] = []  # (kind, path) of every counted call
        self.raised = False  # the injected fault was raised (it may still be swallowed)
        self._undo: list[tuple[Any, str, Any]] = []

    # ---- counting ---------------------------------------------------------------------------
    def _hit(self, kind: str, path: Any) -> OSError | None:
        """Count one call; the error to raise when it is the one to fail."""
        if kind not in self.kinds or self._paused:
            return None
        if isinstance(path, int):  # an fsync's descriptor: the file it belongs to
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                pass
        if self.only is not None and not self.only(str(path)):
            return None
        self.calls += 1
        self.log.append((kind, str(path)))
        if self.fail_at is not None and (
            self.calls == self.fail_at or (self.repeat and self.calls > self.fail_at)
        ):
            self.raised = True
            return OSError(self.errno, os.strerror(self.errno), str(path))
        return None

    def _wrap(self, kind: str, real: Callable, path_of: Callable[..., Any],
              native: bool = False, when: Callable[..., bool] | None = None) -> Callable:
        def patched(*args: Any, **kwargs: Any) -> Any:
            if when is not None and not when(*args, **kwargs):
                return real(*args, **kwargs)
            error = self._hit(kind, path_of(*args, **kwargs))
            if error is None:
                return real(*args, **kwargs)
            if native:  # the library writes (part of) its file, then the disk is full
                try:
                    real(*args, **kwargs)
                except Exception:  # noqa: BLE001 - the injected fault is what is reported
                    pass
            raise error

        return patched

    def _renamer(self, real: Callable) -> Callable:
        def rename(src: Any, dst: Any, *a: Any, **k: Any) -> Any:
            out = real(src, dst, *a, **k)
            if self.after_rename is not None and not self._paused:
                self._paused = True
                try:
                    self.after_rename(str(dst))
                finally:
                    self._paused = False
            return out

        return rename

    def _patch(self, owner: Any, name: str, replacement: Callable) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def __enter__(self) -> Faults:
        first = lambda *a, **k: a[0] if a else next(iter(k.values()), "?")  # noqa: E731
        second = lambda *a, **k: a[1] if len(a) > 1 else k.get("where", k.get("filename"))  # noqa: E731
        for owner, name in ((os, "replace"), (os, "rename")):
            self._patch(owner, name, self._wrap("rename", self._renamer(getattr(owner, name)),
                                                first))
        # counted, not done: a test needs no durability, and 20 real fsyncs a run add up
        self._patch(os, "fsync", self._wrap("fsync", lambda fd: None, first))
        # a folder that exists answers EEXIST before any disk is asked: not a fault to count
        self._patch(os, "mkdir", self._wrap("mkdir", os.mkdir, first,
                                            when=lambda path, *a, **k: not os.path.exists(path)))
        real_open = builtins.open

        def opens_for_writing(file: Any, mode: str = "r", *a: Any, **k: Any) -> bool:
            return _writing_mode(k.get("mode", mode)) and not isinstance(file, int)

        writing_open = self._wrap("write", real_open, first, when=opens_for_writing)
        self._patch(builtins, "open", writing_open)
        self._patch(io, "open", writing_open)
        self._patch(os, "open", self._wrap(
            "write", os.open, first,
            when=lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS)))
        try:
            self._native_writers(first, second)
        except BaseException:
            self.__exit__()  # a half-patched os would break every test after this one
            raise
        return self

    def _native_writers(self, first: Callable, second: Callable) -> None:
        import pyarrow.parquet as pq

        self._patch(pq, "write_table", self._wrap("write", pq.write_table, second, native=True))
        import faiss

        self._patch(faiss, "write_index",
                    self._wrap("write", faiss.write_index, second, native=True))
        import torch

        self._patch(torch, "save", self._wrap("write", torch.save, second, native=True))
        import safetensors.torch
        import vqret.diffusion.checkpoint as diffusion_checkpoint

        # the tokenizer's checkpoint imports save_file when it saves: patched in safetensors
        save_file = self._wrap("write", safetensors.torch.save_file, second, native=True)
        for owner in (safetensors.torch, diffusion_checkpoint):
            self._patch(owner, "save_file", save_file)
        from PIL import Image

        self._patch(Image.Image, "save", self._wrap(
            "write", Image.Image.save, second, native=True,
            when=lambda image, fp, *a, **k: isinstance(fp, (str, os.PathLike))))

    def __exit__(self, *exc: object) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)
        self._undo.clear()


def temp_files(folder: os.PathLike | str) -> list[str]:
    """What a killed or failed writer may leave: ".tmp-" and ".old-" names, anywhere below."""
    found = []
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            if name.startswith((".tmp-", ".old-")):
                found.append(os.path.relpath(os.path.join(base, name), folder))
    return sorted(found)
