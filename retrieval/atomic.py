"""Files that are either the old version or the new one, never half written."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through `write(tmp_path)` beside `path`, then rename: a run killed mid-save keeps
    the previous file. (For bytes that must survive a power cut too: store.write_atomic.)"""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(str(tmp))
        umask = os.umask(0)  # safetensors writes 0600; give it a new file's usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
