"""Find the image files under a folder, in a deterministic order."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS

__all__ = ["SKIPPED_DIRS", "FileEntry", "walk_images"]

# Tool, OS and NAS bookkeeping folders, compared case-insensitively (Windows and SMB shares
# are case-insensitive). Names starting with "." are skipped separately.
SKIPPED_DIRS: frozenset[str] = frozenset(
    ["node_modules", "@eadir", "__macosx", "$recycle.bin", "system volume information"]
)

OnError = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class FileEntry:
    relpath: str  # relative to the walked root, "/"-separated on every OS
    size: int  # bytes
    mtime_ns: int


def walk_images(
    root: Path,
    *,
    exclude: Iterable[Path] = (),
    follow_symlinks: bool = True,
    on_error: OnError | None = None,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> Iterator[FileEntry]:
    """Yield the image files under `root`, depth-first, entries sorted by name in each folder.

    Skipped: hidden names, SKIPPED_DIRS, the folders and files in `exclude` (matched by
    identity, so another spelling or a symlink to them is excluded too) and names that are not
    valid UTF-8. Symlinks are followed unless `follow_symlinks` is False, in which case they
    are ignored entirely; each real folder is walked once, so symlink loops end. Unreadable
    folders, broken symlinks and the like are passed to `on_error(relpath, cause)` and
    skipped. Errors on `root` itself raise. `extensions`: the files listed, by their
    lower-case extension (the videos' walk passes video.VIDEO_EXTENSIONS).
    """

    def report(relpath: str, cause: str) -> None:
        if on_error is not None:
            on_error(_printable(relpath), cause)

    excluded = {_identity(p) for p in map(Path, exclude) if os.path.exists(p)}
    root_str = os.fspath(root)
    visited = {_identity(root_str)}
    # A stack of per-folder iterators, not recursion: deep trees must not hit the
    # recursion limit, and it keeps the output in name order.
    stack = [_sorted_entries(root_str, "")]

    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        dir_entry, relpath = entry
        name = dir_entry.name
        if name.startswith("."):
            continue
        try:
            if not follow_symlinks and dir_entry.is_symlink():
                continue
            is_dir = dir_entry.is_dir()
            is_file = not is_dir and dir_entry.is_file()
        except OSError as err:
            report(relpath, _cause(err))
            continue

        if is_dir:
            if name.lower() in SKIPPED_DIRS:
                continue
            if not _is_utf8(name):
                report(relpath, "folder name is not valid UTF-8")
                continue
            try:
                key = _identity(dir_entry.path)
            except OSError as err:
                report(relpath, _cause(err))
                continue
            if key in excluded:
                continue
            if key in visited:
                report(relpath, "folder already walked (symlink loop or duplicate link)")
                continue
            visited.add(key)
            try:
                stack.append(_sorted_entries(dir_entry.path, relpath + "/"))
            except OSError as err:
                report(relpath, _cause(err))
        elif is_file:
            if os.path.splitext(name)[1].lower() not in extensions:
                continue
            if not _is_utf8(name):
                report(relpath, "file name is not valid UTF-8")
                continue
            try:
                st = dir_entry.stat()
                if excluded and _identity(dir_entry.path, st) in excluded:
                    continue
            except OSError as err:
                report(relpath, _cause(err))
                continue
            yield FileEntry(relpath=relpath, size=st.st_size, mtime_ns=st.st_mtime_ns)
        elif dir_entry.is_symlink():
            report(relpath, "broken symlink")
        # anything else (sockets, fifos, devices) is silently not an image


def _sorted_entries(path: str, prefix: str) -> Iterator[tuple[os.DirEntry[str], str]]:
    # Read the whole folder now: the scandir handle is closed before we descend, so deep trees
    # don't hold one open file descriptor per level.
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    return ((e, prefix + e.name) for e in entries)


def _identity(path: str | os.PathLike[str], st: os.stat_result | None = None) -> tuple[int, int]:
    if st is None or st.st_ino == 0:  # DirEntry.stat() leaves st_ino/st_dev zero on Windows
        st = os.stat(path)
    return st.st_dev, st.st_ino


def _is_utf8(name: str) -> bool:
    # os.scandir hands undecodable bytes back as lone surrogates (surrogateescape); such
    # names can't be stored as UTF-8 text and would crash the index writer later.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(relpath: str) -> str:
    # Undecodable bytes shown as \xNN, so callers can print or log the path.
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _cause(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__
