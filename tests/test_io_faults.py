"""Every I/O fault ends in one line and a store that is still right (docs/reliability.md).

Fault injection as SQLite tests its I/O errors: tests/faults.py makes the Nth write, rename,
fsync or mkdir of a command raise ENOSPC. For every N up to the number of such calls the
command makes, each loop checks that
- the command fails with one line (exit 1, no traceback) or, where the fault is one vqret
  may ignore (a folder's fsync), completes;
- the store opens and answers exactly as at a commit (the one before the run or the run's);
- the next run completes, with every row and unchanged ids, and no temp files are left.

The commands run in-process through typer (the tiny fixture model loaded once and handed to
them), so that a loop of ~40 runs stays a few seconds; a few subprocess runs check what a
user sees. Real faults too: a full tmpfs, a read-only mount (when the test runs as root and
may mount; skipped otherwise, with the reason).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TESTS, run_cli
from faults import Faults, temp_files
from fixtures.shapes import make_shape_folder
from typer.testing import CliRunner
from vqret.cli.main import app
from vqret.retrieval.io_errors import as_os_error, describe, is_environmental
from vqret.retrieval.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

NO_SPACE = "no space left on device"


@pytest.fixture(autouse=True)
def shared_model(monkeypatch, embedder):
    """Every command of these tests gets the session's tiny model instead of loading it."""
    from vqret.retrieval.embedder import Embedder

    monkeypatch.setattr(Embedder, "from_spec", classmethod(lambda cls, spec, **kw: embedder))


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line(result, *words: str) -> str:
    """The command failed the way every I/O fault must: exit 1, one line, no traceback."""
    assert isinstance(result.exception, SystemExit), f"a traceback: {result.exception!r}"
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def store_state(store_path: Path) -> dict[str, Any]:
    """What a reader sees: every row's (path, id), and the answer to a search by the first
    row's vector (its own id, through the index a search uses)."""
    from vqret.api import Collection

    store = Store(store_path)
    rows = store.read_table(["id", "path"]).to_pylist()
    state = {"rows": sorted((r["path"], r["id"]) for r in rows)}
    if store.count("texts"):
        texts = store.read_table(["id", "text"], "texts").to_pylist()
        state["texts"] = sorted((r["text"], r["id"]) for r in texts)
    ids, vectors = store.vectors()
    if len(ids):
        hit = Collection.open(store_path).search(embedding=vectors[0], k=1)[0]
        state["answer"] = (hit.id == ids[0])
    return state


def fault_loop(
    template: Path,
    command: Callable[[Path], list[str]],
    state: Callable[[Path], Any],
    tmp_path: Path,
    error: int = errno.ENOSPC,
) -> int:
    """Run `command` (on a copy of `template`) failing at each of its counted calls in turn;
    returns how many calls there were."""
    before = state(template)
    counted = tmp_path / "counted"
    shutil.copytree(template, counted)
    # what a reader sees after each commit of the run: a fault may stop it after any of them
    committed = [before]

    def snapshot(target: str) -> None:
        if Path(target).name == "manifest.json":
            committed.append(state(counted))

    with Faults(after_rename=snapshot) as counting:
        result = invoke(*command(counted))
    assert result.exit_code == 0, result.output
    after = state(counted)
    committed.append(after)
    assert after != before and counting.calls > 3
    cause = os.strerror(error).lower()
    for n in range(1, counting.calls + 1):
        work = tmp_path / f"fault-{n}"
        shutil.copytree(template, work)
        with Faults(fail_at=n, error=error) as faults:
            result = invoke(*command(work))
        kind, path = counting.log[n - 1]
        where = f"fault {n}/{counting.calls} ({kind} {path})"
        assert faults.raised, where
        if result.exit_code != 0:
            assert_one_line(result, cause)
        else:  # only a folder's fsync may be ignored: the file itself is already safe
            assert kind == "fsync", f"{where}: the fault was swallowed"
        at_fault = state(work)
        assert at_fault in committed, where
        again = invoke(*command(work))
        assert again.exit_code == 0, f"{where}: the next run failed: {again.output}"
        assert_same_rows(state(work), after, at_fault, where)
        assert temp_files(work) == [], where
        shutil.rmtree(work)
    return counting.calls


def assert_same_rows(got: dict, wanted: dict, committed: dict, where: str) -> None:
    """`got` holds the rows `wanted` does, and every row committed before keeps its id. (A
    row that never got committed may get another id than in a run without faults: ids are
    handed out once, and a failed commit's may be skipped, never reused.)"""
    for key, value in wanted.items():
        if key not in ("rows", "texts"):
            assert got[key] == value, where
            continue
        ids = dict(got[key])
        assert sorted(ids) == sorted(dict(value)), where
        assert len(set(ids.values())) == len(ids), where
        kept = {k: i for k, i in committed.get(key, []) if k in ids}
        assert all(ids[k] == i for k, i in kept.items()), f"{where}: a committed id changed"


# ---- the one line --------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, ["couldn't write the store's manifest", NO_SPACE, "free space"]),
    (errno.EDQUOT, ["couldn't write", "quota"]),
    (errno.EIO, ["input/output error", "check the disk"]),
    (errno.EACCES, ["permission denied", "write permission"]),
    (errno.EPERM, ["operation not permitted", "write permission"]),
    (errno.EROFS, ["couldn't write", "read-only file system", "searching still works"]),
    (errno.ENOENT, ["no such file or directory", "removed while vqret wrote"]),
])
def test_each_cause_names_the_path_and_what_to_do(code, words):
    error = OSError(code, os.strerror(code), "/s/.vqret/.tmp-0123abcd-manifest.json")
    error.vqret_doing = "write"
    line = describe(error)
    assert "\n" not in line and "/s/.vqret/manifest.json" in line and ".tmp-" not in line
    assert line.endswith("then run again: committed rows are kept")
    for word in words:
        assert word in line.lower(), line


def test_library_errors_without_an_errno_are_recognised(tmp_path):
    # faiss and torch raise RuntimeError with the C library's words
    faiss_like = RuntimeError("Error in faiss::FileIOWriter: fwrite: No space left on device")
    assert as_os_error(faiss_like).errno == errno.ENOSPC
    assert is_environmental(faiss_like) and is_environmental(MemoryError())
    assert not is_environmental(RuntimeError("Unsupported operator aten::foo"))
    assert as_os_error(RuntimeError("unsupported op"), tmp_path / "x") is None  # disk has room


# ---- index ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, embedder):
    """A folder of 6 drawings indexed (text encoder exported), then changed: 3 new, 1 gone."""
    from vqret.api import Collection

    folder = tmp_path_factory.mktemp("indexed") / "photos"
    make_shape_folder(folder, 6, seed=5)
    collection = Collection.create(folder, embedder=embedder)
    collection.index()
    assert collection.prepare_fast_text_search().startswith("exported")
    make_shape_folder(folder.parent / "more", 3, seed=6)
    for f in (folder.parent / "more").iterdir():
        shutil.move(f, folder / f"new-{f.name}")
    next(p for p in sorted(folder.iterdir()) if p.is_file()).unlink()
    return folder


def test_index_every_fault(indexed, tmp_path):
    calls = fault_loop(
        indexed, lambda work: ["index", work, "--device", "cpu", "--workers", "0", "--quiet"],
        lambda work: store_state(work / ".vqret"), tmp_path,
    )
    assert calls >= 20  # parts, manifests, the index: the loop went through all of them


def test_index_texts_every_fault(indexed, tmp_path):
    captions = tmp_path / "captions.csv"
    captions.write_text("text\na red circle\na blue square\na green triangle\n")
    fault_loop(indexed, lambda work: ["index-texts", captions, "--store", work / ".vqret",
                                      "--device", "cpu"],
               lambda work: store_state(work / ".vqret"), tmp_path)
