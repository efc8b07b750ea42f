"""Keep a store in step with its folder as files change (`vqret watch`, `vqret serve --watch`).

watchfiles reports the folder's changes (inotify on Linux; `poll=True` stats the tree instead,
for network mounts that send no events). A round is the changes of one quiet period: watchfiles
yields once no change came for `step_ms`, or after `debounce_ms` while they keep coming, and
what arrives while a round runs waits for the next one. So a copy of 10,000 files is a few
rounds, not 10,000.

Each round is one ordinary incremental pass over the whole folder (indexer.py): renames keep
their ids, deletions and modifications follow the same rules as `vqret index`, and a change
watchfiles missed (a folder copied in before its watch was added) is still found. A pass over
an unchanged folder only lists and stats it (0.12 s for 5,000 files on the 2-core build
machine), so restricting it to the changed paths would save little and need a second planner.

Files still being written are held back: a file written in the last `settle_s` is stat'ed
again after `settle_s`; one whose size or mtime moved is left out of the pass (or, if it has a
row, keeps that row as it is) and looked at again in a later round. watchfiles has no
close-write event, so a stable size and mtime is the signal.

Nothing here prints: each round's report goes to `on_round`, errors to `on_error`. Every
commit is the indexer's (atomic), so a watcher killed at any point loses nothing committed,
and its first pass on the next start catches up with what changed meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import IMAGE_EXTENSIONS
from .indexer import IndexReport, index_folder
from .store import Store, StoreLockedError
from .walk import FileEntry, walk_images

STEP_MS = 500  # quiet time that ends a burst of changes
DEBOUNCE_MS = 10_000  # longest a burst is gathered while changes keep coming
SETTLE_S = 0.5  # a just-written file must keep its size and mtime this long to be indexed
TICK_MS = 1000  # with no change, how often held files and a locked store are retried
SIDECAR_EXTENSIONS = frozenset({".txt", ".json"})  # captions beside images (texts.py)

Walk = Callable[..., Iterable[FileEntry]]
IndexOnce = Callable[[Walk], IndexReport]  # one incremental pass, listing with the given walk


@dataclass
class Round:
    """What one round did: the pass's report and the store it left."""

    report: IndexReport
    generation: int  # the store's generation after the pass
    images: int  # rows in the store after the pass
    changes: int  # file events the round handled (0: the first pass, or a retry)
    held: list[str] = field(default_factory=list)  # files left for later: still being written
    first: bool = False  # the pass run on start, catching up with changes made while down

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict() | {
            "generation": self.generation,
            "images": self.images,
            "changes": self.changes,
            "held": len(self.held),
            "first": self.first,
        }


class FolderWatcher:
    """Watch `folder` and run `index_once` after each burst of changes (see the module doc).

    `index_once(walk)` runs one incremental pass over the folder listing it with `walk` (the
    watcher's wrapper of walk_images); `watch_folder` below builds it from a store and an
    embedder. `run()` blocks until `stop()` (or Ctrl-C); `start()` runs it in a thread.
    """

    def __init__(
        self,
        store: Store,
        folder: Path | str,
        index_once: IndexOnce,
        *,
        poll: bool = False,
        step_ms: int = STEP_MS,
        debounce_ms: int = DEBOUNCE_MS,
        settle_s: float = SETTLE_S,
        tick_ms: int = TICK_MS,
        on_round: Callable[[Round], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        self.store = store
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"{folder}: not a folder")
        self.index_once = index_once
        self.poll = poll
        self.step_ms = step_ms
        self.debounce_ms = debounce_ms
        self.settle_s = settle_s
        self.tick_ms = tick_ms
        self.on_round = on_round
        self.on_error = on_error
        self._stop = threading.Event()
        self._store_dir = str(Path(store.path).resolve())
        self._held: set[str] = set()  # relpaths still being written at the last pass
        self._pending: set[str] = set()  # changed relpaths of a round that couldn't run yet
        self._retry = False  # the last pass found the store locked: run again on a tick
        self._locked_reported = False
        self.rounds = 0

    # ---- running --------------------------------------------------------------------------
    def run(self, first_pass: bool = True) -> None:
        """Watch until stop(). With `first_pass`, one pass runs as soon as the watch is set up
        (so nothing changed during that pass is missed either)."""
        from watchfiles import watch

        first = first_pass
        for changes in watch(
            self.folder,
            watch_filter=self._wanted,
            step=self.step_ms,
            debounce=self.debounce_ms,
            rust_timeout=self.tick_ms,
            yield_on_timeout=True,  # the ticks that retry held files
            stop_event=self._stop,
            force_polling=self.poll,
            # a tree can hold folders this user can't read: the pass reports them, not a crash
            ignore_permission_denied=True,
        ):
            if self._stop.is_set():
                break
            changed = {self._relpath(path) for _, path in changes}
            self._pending |= changed
            if not (first or changed or self._held or self._retry):
                continue  # an idle tick
            self._round(len(changed), first)
            first = False

    def start(self, first_pass: bool = True) -> threading.Thread:
        """run() in a daemon thread; errors it can't go on from go to on_error."""

        def target() -> None:
            try:
                self.run(first_pass)
            except Exception as e:  # noqa: BLE001 - a server's watcher reports, never kills it
                self._error(f"watching {self.folder} stopped: {e}")

        thread = threading.Thread(target=target, name=f"watch {self.folder.name}", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    # ---- one round ------------------------------------------------------------------------
    def _round(self, changes: int, first: bool) -> None:
        candidates = self._pending | self._held
        unstable, settled = self._settle(candidates)
        held: set[str] = set()
        walk = self._walk(unstable, settled, held)
        try:
            report = self.index_once(walk)
        except StoreLockedError as e:
            # another writer (a `vqret index`): keep the changes, try again on the next tick
            if not self._locked_reported:
                self._error(f"{e}; retrying")
                self._locked_reported = True
            self._retry = True
            return
        self._retry = self._locked_reported = False
        self._pending.clear()
        self._held = held
        self.rounds += 1
        self.store.refresh()
        if self.on_round is not None:
            self.on_round(Round(report, self.store.generation, len(self.store), changes,
                                sorted(held), first))

    def _settle(self, relpaths: set[str]) -> tuple[set[str], set[str]]:
        """(unstable, settled) among the files written in the last settle_s: stat'ed, then
        again after settle_s. Older files, and files gone, are in neither."""
        young: dict[str, tuple[int, int]] = {}
        limit = time.time_ns() - int(self.settle_s * 1e9)
        for rel in relpaths:
            stat = _stat(self.folder / rel)
            if stat is not None and stat[1] > limit:
                young[rel] = stat
        if not young:
            return set(), set()
        self._stop.wait(self.settle_s)
        unstable = {rel for rel, stat in young.items() if _stat(self.folder / rel) != stat}
        return unstable, set(young) - unstable

    def _walk(self, unstable: set[str], settled: set[str], held: set[str]) -> Walk:
        """walk_images, holding back files still being written: the ones found unstable, and
        any file written in the last settle_s that no round checked (changes watchfiles did
        not report). A held file with a row keeps the row as stored; a new one waits."""
        store = self.store
        settle_ns = int(self.settle_s * 1e9)

        def walk(root: Path, **kwargs: Any) -> Iterator[FileEntry]:
            limit = time.time_ns() - settle_ns
            stored: dict[str, tuple[int, int]] | None = None
            for entry in walk_images(root, **kwargs):
                rel = entry.relpath
                if rel in unstable or (entry.mtime_ns > limit and rel not in settled):
                    held.add(rel)
                    if stored is None:  # read once, only when some file is held
                        stored = _stored_stats(store)
                    if rel in stored:
                        yield FileEntry(rel, *stored[rel])
                    continue
                yield entry

        return walk

    # ---- events ---------------------------------------------------------------------------
    def _wanted(self, change: Any, path: str) -> bool:
        """Changes the store cares about: not the store's own files, not hidden names (the
        walk skips them), not files that are neither images nor captions."""
        if path == self._store_dir or path.startswith(self._store_dir + os.sep):
            return False
        rel = os.path.relpath(path, self.folder)
        if rel == "." or rel.startswith(".."):
            return False
        if any(part.startswith(".") for part in rel.split(os.sep)):
            return False
        suffix = os.path.splitext(rel)[1].lower()
        # no suffix: most likely a folder (moved, deleted), which the pass must see
        return not suffix or suffix in IMAGE_EXTENSIONS or suffix in SIDECAR_EXTENSIONS

    def _relpath(self, path: str) -> str:
        return os.path.relpath(path, self.folder).replace(os.sep, "/")

    def _error(self, message: str) -> None:
        if self.on_error is not None:
            self.on_error(message)


def _stat(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file; None for anything else or a file gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return stat.st_size, stat.st_mtime_ns


def _stored_stats(store: Store) -> dict[str, tuple[int, int]]:
    rows = store.read_table(["path", "size", "mtime_ns"]).to_pydict()
    return {p: (s, m) for p, s, m in zip(rows["path"], rows["size"], rows["mtime_ns"],
                                         strict=True) if s is not None and m is not None}


def watch_folder(
    store: Store,
    embedder: Any,
    folder: Path | str | None = None,
    *,
    poll: bool = False,
    on_round: Callable[[Round], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    watcher_options: dict[str, Any] | None = None,
    **index_options: Any,
) -> FolderWatcher:
    """A FolderWatcher whose passes are `index_folder(store, embedder, folder, ...)`
    (`index_options`: its keyword arguments: on_failure, on_progress, wait, commit_every...).

    `store` should be a Store object of its own, not one a reader in another thread refreshes:
    the pass's writer keeps uncommitted state (the next id) in it."""
    folder = Path(folder if folder is not None else store.root)

    def index_once(walk: Walk) -> IndexReport:
        return index_folder(store, embedder, folder, walk=walk, **index_options)

    return FolderWatcher(store, folder, index_once, poll=poll, on_round=on_round,
                         on_error=on_error, **(watcher_options or {}))


__all__ = ["DEBOUNCE_MS", "SETTLE_S", "STEP_MS", "FolderWatcher", "Round", "watch_folder"]
