"""`vqret watch` and `vqret serve --watch`: the store kept in step with a folder as it changes.

The watcher runs in a subprocess, as a user runs it, on tmp folders (and loopback for the
server). Nothing waits on the clock: each "eventually" is a poll with a generous deadline that
only stops a broken run from hanging; how soon things show up is `vqret bench watch`'s job.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_json
from fixtures.shapes import draw_shape, make_shape_folder
from PIL import Image
from vqret.retrieval.store import Store
from vqret.retrieval.walk import walk_images

pytestmark = pytest.mark.usefixtures("one_thread")

HANG_GUARD_S = 180  # only stops a broken run from hanging


# ---- helpers --------------------------------------------------------------------------------


class Running:
    """A `vqret ...` subprocess whose stdout lines are collected as they come."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vqret.cli.main", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines.put),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr.append),
                         daemon=True).start()

    @staticmethod
    def _read(stream, put) -> None:
        for line in stream:
            put(line)

    def next_line(self) -> str:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            try:
                return self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise AssertionError(f"exited {self.proc.returncode}:\n"
                                         + "".join(self.stderr)) from None
        raise AssertionError("no output in time:\n" + "".join(self.stderr))

    def drain(self) -> list[str]:
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get())
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory, embedder) -> Path:
    """The fixture model's ONNX text encoder, exported once: a watcher's first pass exports it
    into a store that lacks it (as `index` does), seconds each on a busy machine."""
    from vqret import Collection

    folder = tmp_path_factory.mktemp("exported") / "photos"
    folder.mkdir()
    collection = Collection.create(folder, embedder=embedder)
    assert collection.prepare_fast_text_search().startswith("exported")
    return collection.store.path / "text_encoder"


def new_store(folder: Path, embedder, text_encoder: Path) -> None:
    """An empty store for `folder`, with the text encoder already exported."""
    from vqret import Collection

    store = Collection.create(folder, embedder=embedder).store
    shutil.copytree(text_encoder, store.path / text_encoder.name)


def start_watch(folder: Path, tiny_clip, *extra: str) -> tuple[Running, dict]:
    """`vqret watch FOLDER --json`, and its first pass's line (the watch is set up by then)."""
    watcher = Running("watch", str(folder), "--model", tiny_clip[0], "--pretrained",
                      tiny_clip[1], "--device", "cpu", "--json", *extra)
    first = json.loads(watcher.next_line())
    assert first["first"] is True
    return watcher, first


def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, KeyError):  # a part replaced between the manifest and the read
            pass
        time.sleep(0.2)
    raise AssertionError(f"not in time: {what}")


def disk_listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {e.relpath: (e.size, e.mtime_ns)
            for e in walk_images(folder, exclude=[folder / ".vqret"])}


def stored(folder: Path, columns=("path", "size", "mtime_ns", "hash", "id")) -> dict[str, dict]:
    rows = Store.open(folder / ".vqret").read_table(list(columns)).to_pylist()
    return {r["path"]: r for r in rows}


def in_sync(folder: Path) -> bool:
    """Every file has its row with its current size and mtime, and no row is left over."""
    rows = stored(folder, ("path", "size", "mtime_ns"))
    return {p: (r["size"], r["mtime_ns"]) for p, r in rows.items()} == disk_listing(folder)


def write_png(path: Path, color: str, shape: str, seed: int) -> None:
    draw_shape(color, shape, np.random.default_rng(seed)).save(path)


# ---- vqret watch ----------------------------------------------------------------------------


def test_watch_follows_every_kind_of_change_and_matches_a_fresh_index(tmp_path, tiny_clip,
                                                                     embedder, text_encoder):
    from vqret import Collection

    folder = tmp_path / "photos"
    drawn = make_shape_folder(folder, 12, seed=5)
    past = time.time() - 60
    for path in folder.iterdir():  # not "being written" when the watcher starts
        os.utime(path, (past, past))
    new_store(folder, embedder, text_encoder)
    watcher, first = start_watch(folder, tiny_clip)
    try:
        assert first["added"] == 12 and first["images"] == 12
        before = stored(folder)
        names = [p.name for p, *_ in drawn]

        write_png(folder / "new_red_circle.png", "red", "circle", seed=101)  # add
        write_png(folder / names[1], "blue", "star", seed=102)  # modify in place
        (folder / names[2]).unlink()  # delete
        (folder / "sub").mkdir()
        os.rename(folder / names[3], folder / "sub" / "renamed.png")  # rename (and move)
        shutil.copyfile(folder / names[4], folder / "sub" / "copy.png")  # copy
        eventually(lambda: in_sync(folder), "the store in step with the folder")

        after = stored(folder)
        fresh = Collection.create(folder, tmp_path / "fresh", embedder=embedder)
        fresh.index()
        fresh_rows = {r["path"]: r["hash"] for r in fresh.store.read_table(["path", "hash"])
                      .to_pylist()}
        assert {p: r["hash"] for p, r in after.items()} == fresh_rows  # same paths and hashes
        unchanged = set(names) - {names[1], names[2], names[3]}
        assert all(after[n]["id"] == before[n]["id"] for n in unchanged)
        assert after["sub/renamed.png"]["id"] == before[names[3]]["id"]  # a rename keeps its id
        assert after[names[1]]["id"] == before[names[1]]["id"]  # updated in place
        assert after[names[1]]["hash"] != before[names[1]]["hash"]
        assert after["sub/copy.png"]["id"] not in {r["id"] for r in before.values()}

        # Files written one at a time are found by a search once their pass commits.
        searcher = Collection(Store.open(folder / ".vqret"), embedder)
        latencies = []
        for i, (color, shape) in enumerate([("green", "square"), ("yellow", "triangle"),
                                            ("red", "star"), ("blue", "circle")]):
            name = f"late_{i}_{color}_{shape}.png"
            written = time.monotonic()
            write_png(folder / name, color, shape, seed=200 + i)
            query = f"a {color} {shape}"
            eventually(lambda name=name, query=query: name in {
                h.path for h in searcher.search(text=query, k=100)
            }, f"{name} found by a search")
            latencies.append(time.monotonic() - written)
        print(f"seconds from written to found: {[round(s, 2) for s in latencies]}")
        # and by `vqret search` itself
        hits = run_json("search", "a red star", "--store", str(folder / ".vqret"), "-k", "100",
                        "--device", "cpu")
        assert "late_2_red_star.png" in {h["path"] for h in hits}
        lines = [json.loads(line) for line in watcher.drain()]
        assert lines and all(not line["failed"] for line in lines)
    finally:
        watcher.stop()
    assert watcher.proc.returncode == 130  # Ctrl-C: "committed work is kept"


def test_a_burst_is_a_few_commits_and_a_killed_watcher_catches_up(tmp_path, tiny_clip,
                                                                  embedder, text_encoder):
    folder = tmp_path / "photos"
    make_shape_folder(folder, 2, seed=7)
    new_store(folder, embedder, text_encoder)
    staging = tmp_path / "staging"
    staging.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6000):  # tiny distinct images: the burst costs its file count, not pixels
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            staging / f"{i:05d}.png")
    staged = sorted(staging.iterdir())

    watcher, _ = start_watch(folder, tiny_clip)
    generation = Store.open(folder / ".vqret").generation
    try:
        (folder / "burst").mkdir()
        for path in staged[:5000]:
            shutil.copy(path, folder / "burst" / path.name)
        rounds = []  # one JSON line per pass, printed once it has committed
        while sum(r["added"] for r in rounds) < 5000:
            rounds.append(json.loads(watcher.next_line()))
        assert in_sync(folder) and len(Store.open(folder / ".vqret")) == 5002
        assert len(rounds) <= 20, len(rounds)
        print(f"5,000 files: {len(rounds)} watcher commit(s), "
              f"{Store.open(folder / '.vqret').generation - generation} store generations")
        ids = {p: r["id"] for p, r in stored(folder).items()}

        # kill -9 while a pass is committing (or just after), then add files while it's down
        committed = Store.open(folder / ".vqret").generation
        for path in staged[5000:5500]:
            shutil.copy(path, folder / "burst" / path.name)
        eventually(lambda: Store.open(folder / ".vqret").generation > committed,
                   "a pass under way")
    finally:
        watcher.proc.kill()
        watcher.proc.wait()
    for path in staged[5500:]:
        shutil.copy(path, folder / "burst" / path.name)
    (folder / "burst" / "00000.png").unlink()

    # restarted as `vqret index --watch`: its own run is the catch-up, then it watches
    restarted = Running("index", str(folder), "--model", tiny_clip[0], "--pretrained",
                        tiny_clip[1], "--device", "cpu", "--json", "--watch")
    try:
        caught_up = json.loads(restarted.next_line())
        assert caught_up["added"] >= 500 and caught_up["removed"] == 1
        assert in_sync(folder)  # its run caught up with everything
        assert len(Store.open(folder / ".vqret")) == 2 + 6000 - 1
        now = stored(folder)
        assert all(now[p]["id"] == i for p, i in ids.items() if p != "burst/00000.png")
        write_png(folder / "after_restart.png", "red", "circle", seed=5)  # and it watches
        eventually(lambda: "after_restart.png" in stored(folder), "a file added after restart")
    finally:
        restarted.stop()


# ---- files still being written ----------------------------------------------------------------


def test_a_file_being_written_is_held_and_keeps_its_row(tmp_path, embedder):
    """The stability check, in-process: the wait between the two stats is where the writer
    writes more, so no timing decides the outcome."""
    from vqret import Collection
    from vqret.retrieval.indexer import index_folder
    from vqret.retrieval.watch import FolderWatcher

    folder = tmp_path / "photos"
    make_shape_folder(folder, 3, seed=9)
    past = time.time() - 60
    for path in folder.iterdir():  # written long ago: only the two below are being written
        os.utime(path, (past, past))
    collection = Collection.create(folder, embedder=embedder)
    collection.index()
    store = Store.open(folder / ".vqret")
    old = stored(folder)
    grown = folder / "00000_red_circle.png"  # an indexed file being rewritten
    new = folder / "zz_new.png"  # a new file being written
    payload = grown.read_bytes()
    grown.write_bytes(payload[: len(payload) // 2])
    new.write_bytes(payload[: len(payload) // 3])
    rounds = []
    watcher = FolderWatcher(store, folder, lambda walk: index_folder(
        store, embedder, folder, walk=walk), on_round=rounds.append)

    def writer_writes_more(seconds: float) -> bool:  # stands in for the wait between stats
        with open(grown, "ab") as f:
            f.write(b"\0")
        with open(new, "ab") as f:
            f.write(b"\0")
        return False

    watcher._stop.wait = writer_writes_more  # type: ignore[method-assign]
    watcher._pending = {"00000_red_circle.png", "zz_new.png"}
    watcher._round(2, first=False)
    (done,) = rounds
    assert done.held == ["00000_red_circle.png", "zz_new.png"]
    assert not done.report.failed  # neither was read half-written
    now = stored(folder)
    assert "zz_new.png" not in now
    assert now["00000_red_circle.png"] == old["00000_red_circle.png"]  # the row as it was

    # Written completely (and quiet since): the next round indexes both, the id kept.
    draw_shape("green", "star", np.random.default_rng(3)).save(grown)
    draw_shape("blue", "square", np.random.default_rng(4)).save(new)
    for path in (grown, new):
        os.utime(path, (past, past))
    watcher._round(0, first=False)
    done = rounds[-1]
    assert done.held == [] and not done.report.failed
    now = stored(folder)
    assert now["00000_red_circle.png"]["id"] == old["00000_red_circle.png"]["id"]
    assert now["00000_red_circle.png"]["hash"] != old["00000_red_circle.png"]["hash"]
    assert "zz_new.png" in now and in_sync(folder)


# ---- vqret serve --watch --------------------------------------------------------------------


def test_serve_watch_answers_a_photo_dropped_in(tmp_path, embedder):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from serve_helpers import index_shapes

    folder = tmp_path / "shapes"
    index_shapes(folder, embedder, n=12)
    # --poll: the watcher that stats the tree (network mounts); the watch tests use inotify
    server = Running("serve", "--store", str(folder), "--watch", "--poll", "--port", "0",
                     "--device", "cpu")
    try:
        line = server.next_line()
        assert line.startswith("serving "), line
        url = line.rsplit(" at ", 1)[1].strip()
        with httpx.Client(base_url=url, timeout=HANG_GUARD_S) as http:
            def found() -> bool:
                body = http.post("api/search", json={"text": "a blue star", "k": 100}).json()
                return "dropped_blue_star.png" in {h["path"] for h in body["results"]}

            assert not found()
            write_png(folder / "dropped_blue_star.png", "blue", "star", seed=77)
            eventually(found, "the dropped photo answered by the running server")
    finally:
        server.stop()


def test_a_locked_store_is_retried_and_reported_once(tmp_path, embedder):
    from vqret import Collection
    from vqret.retrieval.watch import watch_folder

    folder = tmp_path / "photos"
    make_shape_folder(folder, 2, seed=11)
    Collection.create(folder, embedder=embedder)  # an empty store
    store = Store.open(folder / ".vqret")
    rounds, errors = [], []
    watcher = watch_folder(store, embedder, on_round=rounds.append, on_error=errors.append,
                           watcher_options={"settle_s": 0.0})
    with Store.open(folder / ".vqret").writer():  # another writer holds the store
        watcher._round(1, first=True)
        watcher._round(0, first=False)
    assert not rounds and len(errors) == 1 and "another writer" in errors[0]
    assert watcher._retry  # the next tick runs the pass
    watcher._round(0, first=False)
    (done,) = rounds
    assert done.report.added == 2 and not watcher._retry and in_sync(folder)
