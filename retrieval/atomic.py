"""Files and folders that are either the old version or the new one, never half written.

The one implementation behind every file vqret replaces in place: the store's manifest and
Parquet parts, index metadata, checkpoints and training state, caches, decoded pictures.
The new content goes to a temp name in the same folder (same filesystem, so the rename is
atomic), is fsynced, renamed over the target, and the folder is fsynced: a run killed at any
moment, or a power cut, leaves the previous file. Temp names start with ".tmp-", which is
how a store's next writer recognises (and removes) what a killed one left.

A failed write raises OSError naming the target and "write" (io_errors.annotate), whichever
library wrote the file: the one line a user sees says what was being written (io_errors.py).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .io_errors import annotate, as_os_error

# bytes or text to write, or a function that writes the file at the path it is given (the
# libraries that only save to a path: safetensors, torch.save, pyarrow, PIL, faiss)
Content = bytes | str | Callable[[str], object]


def atomic_write(path: str | os.PathLike[str], content: Content) -> None:
    """Replace `path` with `content` atomically and durably (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        if callable(content):
            try:
                content(str(tmp))
            except OSError:
                raise
            except Exception as e:  # faiss, torch: a full disk as their RuntimeError
                found = as_os_error(e, tmp)
                if found is None:
                    raise
                raise found from e
        else:
            tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        fsync_file(tmp)
        umask = os.umask(0)  # safetensors writes 0600; give the file a new file's usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except OSError as e:
        annotate(e, "write", path)
        raise
    finally:
        _remove_quietly(tmp)


def replace_folder(new: Path, final: Path) -> None:
    """Put the folder `new` (a sibling of `final`) in place of `final`: readers see the old
    folder, the new one, or, between two renames, none; never a mix of both."""
    for f in new.iterdir():
        if f.is_file():
            fsync_file(f)
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    try:
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(new, final)
        except OSError:
            if old.exists() and not final.exists():
                os.replace(old, final)
            raise
    except OSError as e:
        annotate(e, "write", final)
        raise
    fsync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _remove_quietly(tmp: Path) -> None:
    """Remove a temp file; where even that fails (the folder is gone or read-only), the next
    writer's sweep of ".tmp-" names does it, and the write's own error is the one to report."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to disk (an OSError here is a failed write, and raises)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (the rename) to disk; a no-op where the OS can't (Windows,
    some network filesystems): the file itself is already safe."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
