"""An I/O fault as one line: what was being written, the path, the cause, and what to do.

The one place that turns an OSError (a full disk, a quota, a failing disk, a permission, a
read-only filesystem, a folder removed mid-run) into the line every surface shows: the CLI's
error handler (cli/errors.py), the server's answer to a failed write (server/guard.py). It
also tells a failure of the environment (disk, memory: the next run may succeed) from one of
the thing itself (a model that can't be exported: it never will), which onnx_export.py needs
to record only the second kind.

Libraries that write natively don't all raise OSError: faiss and torch raise RuntimeError
with the C library's message ("No space left on device"), some with no errno at all.
`as_os_error` recovers the errno from the message, or from the disk when the message has
none, so that a full disk reads the same whichever library found it.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

__all__ = [
    "ENVIRONMENT_ERRNOS",
    "annotate",
    "as_os_error",
    "describe",
    "is_environmental",
    "looks_environmental",
]

# What to do, per cause; the sentence ends with "then run again: <what is kept>".
_FIX = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free some of your disk quota",
    errno.EIO: "check the disk (dmesg, fsck)",
    errno.EACCES: "give yourself write permission there (or use another --store/--out)",
    errno.EPERM: "give yourself write permission there (or use another --store/--out)",
    errno.EROFS: "searching still works; to write, use a writable disk (--store/--out)",
    errno.ENOENT: "a folder was removed while vqret wrote into it; make sure it stays",
}
# Errnos that name the disk or the system rather than the data: worth another try later.
ENVIRONMENT_ERRNOS = frozenset(
    {*_FIX, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EBUSY, errno.EAGAIN,
     errno.EINTR, errno.ENOTDIR, errno.ESTALE, errno.ETIMEDOUT}
)
# Only these arise from writing: the line can say "couldn't write" without being told.
_WRITE_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
# What a path is, for people: by the parts of its name (temp names are ".tmp-xxxxxxxx-name").
_KINDS = (
    (re.compile(r"(^|/)manifest\.json$"), "the store's manifest"),
    (re.compile(r"(^|/)images/[^/]*\.parquet$"), "a part of the store's image table"),
    (re.compile(r"(^|/)texts/[^/]*\.parquet$"), "a part of the store's text table"),
    (re.compile(r"\.faiss$|(^|/)(images|texts)\.json$"), "the search index"),
    (re.compile(r"(^|/)(lock|writer\.pid)$"), "the store's lock"),
    (re.compile(r"text_encoder"), "the ONNX text encoder"),
    (re.compile(r"(^|/)diffusion/generated(/|$)"), "a generated picture"),
    (re.compile(r"(^|/)diffusion(/|$)"), "the diffusion model"),
    (re.compile(r"(^|/)tokenizer(/|$)"), "the tokenizer"),
    (re.compile(r"(^|/)latents(/|$)"), "the latents cache"),
)
_TMP_PREFIX = re.compile(r"\.tmp-[0-9a-f]{8}-")
_ERRNO_IN_TEXT = re.compile(r"\[?errno[\s:=]*(\d+)\]?", re.IGNORECASE)
# Below this much free space a writer that failed without saying why ran out of it.
_FULL_BELOW_BYTES = 64 << 10


def annotate(error: OSError, doing: str, path: str | os.PathLike[str]) -> OSError:
    """Record what was being done (a verb: "write") and the path it was for, unless an inner
    caller already did: the innermost knows best. Returns `error`."""
    if getattr(error, "vqret_doing", None) is None:
        error.vqret_doing = doing  # type: ignore[attr-defined]
        error.vqret_path = str(path)  # type: ignore[attr-defined]
    return error


def _errno_of_text(text: str) -> int | None:
    match = _ERRNO_IN_TEXT.search(text)
    if match and int(match.group(1)) in errno.errorcode:
        return int(match.group(1))
    lowered = text.lower()
    for code in sorted(ENVIRONMENT_ERRNOS):
        if os.strerror(code).lower() in lowered:
            return code
    return None


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def as_os_error(
    error: BaseException, path: str | os.PathLike[str] | None = None
) -> OSError | None:
    """`error` as an OSError when it is an I/O fault (itself, a cause in its chain, or a
    library's error whose message names one), else None. With `path` (the file that was
    being written), an error that names no cause counts as a full disk when that disk has
    (next to) no space left: what native writers that say only "write failed" mean."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno is not None:
            return e
    for e in _chain(error):
        code = _errno_of_text(str(e))
        if code is not None:
            return OSError(code, os.strerror(code), None if path is None else str(path))
    if isinstance(error, OSError):
        return error
    if path is not None:
        try:
            disk = os.statvfs(Path(path).parent)
        except (OSError, AttributeError):  # gone, or no statvfs (Windows)
            return None
        if disk.f_bavail * disk.f_frsize < _FULL_BELOW_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def is_environmental(error: BaseException) -> bool:
    """Whether `error` came from the disk or the system (full, quota, permissions, memory,
    a signal), so that trying again later may succeed."""
    if isinstance(error, (MemoryError, KeyboardInterrupt, SystemExit)):
        return True
    found = as_os_error(error)
    return found is not None and (found.errno in ENVIRONMENT_ERRNOS or found.errno is None)


def looks_environmental(reason: str) -> bool:
    """Whether a recorded failure's text names a disk or system cause (see is_environmental):
    a record an older vqret made of a full disk as if the model were at fault."""
    return _errno_of_text(reason) in ENVIRONMENT_ERRNOS


def _what(path: str) -> str:
    name = _TMP_PREFIX.sub("", path.replace(os.sep, "/"))
    for pattern, what in _KINDS:
        if pattern.search(name):
            return what + " "
    return ""


def describe(error: OSError, kept: str = "committed rows are kept") -> str:
    """The one line for an I/O fault: "couldn't write the store's manifest PATH: no space
    left on device; free space on that disk, then run again: committed rows are kept"."""
    code = error.errno
    path = getattr(error, "vqret_path", None) or error.filename
    doing = getattr(error, "vqret_doing", None) or ("write" if code in _WRITE_ONLY else None)
    if code in errno.errorcode:  # the C library's words, not a library's wrapper around them
        cause = os.strerror(code)
    else:
        cause = (error.strerror or str(error) or type(error).__name__).splitlines()[0]
    cause = cause[:1].lower() + cause[1:]
    if path is None:
        where = f"couldn't {doing}" if doing else "I/O error"
    else:
        path = _TMP_PREFIX.sub("", str(path))
        where = f"couldn't {doing} {_what(path)}{path}" if doing else f"{_what(path)}{path}"
    fix = _FIX.get(code, "fix that")
    if code == errno.ENOENT and doing != "write":
        fix = "make sure it is there"  # a file that was read, not a folder written into
    return f"{where}: {cause}; {fix}, then run again: {kept}"
