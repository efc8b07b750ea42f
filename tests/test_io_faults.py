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

Past 500 lines: one loop per command the issue lists, all sharing the helpers at the top
(fault_loop, the state snapshots); split up, each file would need them again.
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
    assert "Traceback" not in result.output, result.output
    # progress lines may come before ("computing latents of 12 images"): one error, the last
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def store_state(store_path: Path) -> dict[str, Any]:
    """What a reader sees: every row's (path, id), and the answer to a search by the oldest
    row's vector (its top 5, through the index a search uses)."""
    from vqret.api import Collection

    store = Store(store_path)
    rows = store.read_table(["id", "path"]).to_pylist()
    state = {"rows": sorted((r["path"], r["id"]) for r in rows)}
    if store.count("texts"):
        texts = store.read_table(["id", "text"], "texts").to_pylist()
        state["texts"] = sorted((r["text"], r["id"]) for r in texts)
    ids, vectors = store.vectors()
    if len(ids):  # by path: a row that was never committed may get another id next run
        oldest = vectors[int(ids.argmin())]  # a row every state has, whatever the parts' order
        hits = Collection.open(store_path).search(embedding=oldest, k=5)
        state["answer"] = [hit.path for hit in hits]
    return state


def fault_loop(
    template: Path,
    command: Callable[[Path], list[str]],
    state: Callable[[Path], Any],
    tmp_path: Path,
    error: int = errno.ENOSPC,
    only: Callable[[str], bool] | None = None,
    check_after: Callable[[Path], None] | None = None,
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

    if only is None:  # the command's own files, not a library's first-use temp files
        only = lambda path: str(tmp_path) in path  # noqa: E731
    with Faults(after_rename=snapshot, only=only) as counting:
        result = invoke(*command(counted))
    assert result.exit_code == 0, result.output
    after = state(counted)
    committed.append(after)
    assert after != before and counting.calls > 3
    cause = os.strerror(error).lower()
    for n in range(1, counting.calls + 1):
        work = tmp_path / f"fault-{n}"
        shutil.copytree(template, work)
        with Faults(fail_at=n, error=error, only=only) as faults:
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
        if check_after is not None:
            check_after(work)
        assert temp_files(work) == [], where
        shutil.rmtree(work)
    return counting.calls


def assert_same_rows(got: dict, wanted: dict, committed: dict, where: str) -> None:
    """`got` holds the rows `wanted` does, and every row committed before keeps its id. (A
    row that never got committed may get another id than in a run without faults: ids are
    handed out once, and a failed commit's may be skipped, never reused.)"""
    if not isinstance(wanted, dict):  # a checkpoint, a picture: exactly the run's
        assert got == wanted, where
        return
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


@pytest.fixture
def export_checked_elsewhere(monkeypatch):
    """The loops over the rows' writes skip `index`'s closing check of the text encoder
    (0.2 s a run, twice a fault): test_onnx_export_every_fault covers that writer."""
    from vqret.retrieval.collection import Collection

    monkeypatch.setattr(Collection, "prepare_fast_text_search", lambda self, **kw: "ready")


def test_index_every_fault(indexed, tmp_path, export_checked_elsewhere):
    calls = fault_loop(
        indexed, lambda work: ["index", work, "--device", "cpu", "--workers", "0", "--quiet"],
        lambda work: store_state(work / ".vqret"), tmp_path,
    )
    assert calls >= 20  # parts, manifests, the index: the loop went through all of them


def test_index_texts_every_fault(indexed, tmp_path, export_checked_elsewhere):
    captions = tmp_path / "captions.csv"
    captions.write_text("text\na red circle\na blue square\na green triangle\n")
    fault_loop(indexed, lambda work: ["index-texts", captions, "--store", work / ".vqret",
                                      "--device", "cpu"],
               lambda work: store_state(work / ".vqret"), tmp_path)


# ---- the ONNX text export ------------------------------------------------------------------

@pytest.fixture
def quick_export(monkeypatch, indexed):
    """torch.onnx.export traces the model for seconds: these exports write the model that
    `indexed` exported instead (through open(), so the faults reach it as they reach the
    real save). ONNX Runtime's optimisation, the checks against torch, the bundle's files
    and its rename: all real."""
    from vqret.retrieval import onnx_export
    from vqret.retrieval.onnx_text import DATA_FILE, MODEL_FILE

    made = indexed / ".vqret" / "text_encoder"
    files = {name: (made / name).read_bytes() for name in (MODEL_FILE, DATA_FILE)}

    def export(module, prefix, tokenizer, path: Path) -> None:
        for name, data in files.items():
            with open(path.parent / name, "wb") as f:
                f.write(data)

    monkeypatch.setattr(onnx_export, "_torch_export", export)


def text_path(store_path: Path) -> str:
    """ready (text searches skip torch), retry (the next index or search exports), or
    recorded (the model was given up on)."""
    from vqret.retrieval.onnx_text import TextEncoderUnavailable, load_text_encoder

    try:
        load_text_encoder(store_path, Store(store_path).spec).embed_texts([])
        return "ready"
    except TextEncoderUnavailable as e:
        return "retry" if e.rebuild else f"recorded: {e.reason}"


@pytest.fixture
def without_export(indexed, tmp_path, embedder):
    """`indexed` brought up to date, its text encoder removed: `vqret index` then writes
    nothing but the export."""
    from vqret.api import Collection

    folder = tmp_path / "template" / "photos"
    shutil.copytree(indexed, folder)
    Collection.create(folder, embedder=embedder).index()
    shutil.rmtree(folder / ".vqret" / "text_encoder")
    return folder


def test_onnx_export_every_fault_is_retried_not_recorded(without_export, tmp_path,
                                                          quick_export):
    state = lambda work: {**store_state(work / ".vqret"), "text": text_path(work / ".vqret")}  # noqa: E731
    assert state(without_export)["text"] == "retry"
    calls = fault_loop(without_export, lambda work: ["index", work, "--device", "cpu",
                                                     "--workers", "0", "--quiet"],
                       state, tmp_path, only=lambda path: "text_encoder" in path)
    assert calls >= 8  # folders, the raw model, tokenizer, meta, fsyncs, the rename


def test_a_disk_failure_recorded_by_an_older_vqret_is_retried(without_export, quick_export):
    """What the issue met: "export failed earlier: ... No space left on device" recorded as
    if the model couldn't be exported; the next search now exports it."""
    from vqret.retrieval.onnx_text import FORMAT_VERSION, library_versions, spec_key

    store = without_export / ".vqret"
    bundle = store / "text_encoder"
    bundle.mkdir()
    (bundle / "meta.json").write_text(json.dumps({
        "format": FORMAT_VERSION, "key": spec_key(Store(store).spec),
        "failed": "torch.onnx.export failed: [Errno 28] No space left on device",
        "versions": library_versions()}))
    assert text_path(store) == "retry"
    result = invoke("search", "a red circle", "--store", store, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) and text_path(store) == "ready"


def test_a_model_that_cant_be_exported_is_still_recorded_once(without_export, monkeypatch):
    from vqret.retrieval import onnx_export
    from vqret.retrieval.onnx_text import TextEncoderUnavailable

    tries = []

    def unsupported(*args):
        tries.append(1)
        raise TextEncoderUnavailable("torch.onnx.export failed: unsupported operator")

    monkeypatch.setattr(onnx_export, "_torch_export", unsupported)
    for _ in range(2):
        result = invoke("index", without_export, "--device", "cpu", "--workers", "0", "--quiet")
        assert result.exit_code == 0, result.output  # the torch path still answers
    assert text_path(without_export / ".vqret") == (
        "recorded: export failed earlier: torch.onnx.export failed: unsupported operator")
    assert len(tries) == 1  # the second run didn't try again


# ---- real faults: a full disk, a read-only filesystem --------------------------------------


def _mount(folder: Path, options: str) -> str | None:
    """Mount a tmpfs at `folder` (or remount it with `options`); why not, when it can't."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    folder.mkdir(parents=True, exist_ok=True)
    remount = os.path.ismount(folder)
    cmd = ["mount", "-o", f"remount,{options}", str(folder)] if remount else \
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mount failed: {e}"
    return None if proc.returncode == 0 else f"mount not permitted here: {proc.stderr.strip()}"


@pytest.fixture
def tmpfs(tmp_path):
    """(folder, mount(options)): a small tmpfs of our own, unmounted afterwards."""
    folder = tmp_path / "tmpfs"

    def mount(options: str) -> None:
        reason = _mount(folder, options)
        if reason is not None:
            pytest.skip(reason)

    yield folder, mount
    if os.path.ismount(folder):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=60)


def test_a_real_full_disk(tmpfs, tmp_path, tiny_clip, quick_export):
    """The issue's run: a store on a 150 KB tmpfs that fills during `vqret index`."""
    disk, mount = tmpfs
    mount("size=150k")
    images = tmp_path / "images"
    make_shape_folder(images, 400, seed=8)
    store = disk / "store"
    model = ["--model", tiny_clip[0], "--pretrained", tiny_clip[1]]
    first = run_cli("index", str(images), "--store", str(store), *model, "--device", "cpu",
                    "--commit-every", "40", "--workers", "0", check=False)
    assert first.returncode == 1 and first.stdout == "", first.stderr
    line = first.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert NO_SPACE in line and str(store) in line and "committed rows are kept" in line
    committed = store_state(store)
    assert 0 < len(committed["rows"]) < 400, line

    mount("size=1m")  # room for the rows, not for the 7 MB text encoder
    args = ["index", images, "--store", store, "--device", "cpu", "--workers", "0", "--quiet"]
    second = invoke(*args)
    assert_one_line(second, "couldn't write the ONNX text encoder", NO_SPACE)
    assert len(store_state(store)["rows"]) == 400
    assert text_path(store) == "retry"  # not recorded as a model that can't be exported
    assert temp_files(store) == []

    mount("size=16m")
    assert invoke(*args).exit_code == 0
    final = store_state(store)
    assert_same_rows(final, final, committed, "after the disk had room again")
    assert text_path(store) == "ready"


@pytest.fixture
def read_only(tmpfs, indexed, embedder):
    """`indexed`, up to date, on a filesystem mounted read-only, its text encoder removed
    (so that a search would like to export it)."""
    from vqret.api import Collection

    disk, mount = tmpfs
    mount("size=16m")
    folder = disk / "photos"
    shutil.copytree(indexed, folder)
    Collection.create(folder, embedder=embedder).index()
    shutil.rmtree(folder / ".vqret" / "text_encoder")
    mount("ro")
    return folder


def search_still_works(folder: Path) -> None:
    store = folder / ".vqret"
    result = invoke("search", "a red circle", "--store", store, "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3
    assert invoke("info", "--store", store).exit_code == 0
    from starlette.testclient import TestClient
    from vqret.server.app import create_app

    app = create_app([str(store)])
    with TestClient(app) as client:
        answer = client.post("/api/search", json={"text": "a red circle", "k": 4})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["results"]) == 4
        there = [r for r in answer.json()["results"] if (folder / r["path"]).is_file()]
        thumb = client.get(there[0]["thumbnail_url"])  # made in memory: nothing written
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"


def test_a_read_only_store_answers_and_index_says_why(read_only):
    search_still_works(read_only)
    result = invoke("index", read_only, "--device", "cpu", "--workers", "0", "--quiet")
    assert_one_line(result, "read-only file system", "searching still works")
    assert not (read_only / ".vqret" / "text_encoder").exists()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_store_nothing_may_be_written_to_answers(indexed, tmp_path, code):
    """A folder without write permission (root ignores permissions, so every write is
    refused by fault injection instead of chmod)."""
    folder = tmp_path / "photos"
    shutil.copytree(indexed, folder)
    invoke("index", folder, "--device", "cpu", "--workers", "0", "--quiet")
    shutil.rmtree(folder / ".vqret" / "text_encoder")
    before = store_state(folder / ".vqret")
    make_shape_folder(folder / "new", 1, seed=99)
    with Faults(fail_at=1, error=code, repeat=True):
        search_still_works(folder)
        result = invoke("index", folder, "--device", "cpu", "--workers", "0", "--quiet")
    assert_one_line(result, os.strerror(code).lower(), "the store's lock")
    assert store_state(folder / ".vqret") == before


def test_a_stale_lock_never_blocks_a_read_nor_the_next_writer(indexed, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(indexed, folder)
    store = folder / ".vqret"
    dead = subprocess.run(["true"], check=True)  # noqa: S607 - its pid is free once it's gone
    del dead
    (store / "lock").write_text("")
    (store / "writer.pid").write_text("999999\tvqret index")  # a writer killed long ago
    search_still_works(folder)
    with Store(store).writer():  # and a live writer holding the lock: reads don't wait
        search_still_works(folder)
    result = invoke("index", folder, "--device", "cpu", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output


# ---- tokenizer, diffusion, generate, serve -------------------------------------------------

TINY_DIT = TESTS / "fixtures" / "tiny_dit"


@pytest.fixture(scope="module")
def generative(tmp_path_factory, embedder):
    """12 drawings indexed, with the fixture tokenizer and DiT in the store."""
    from vqret.api import Collection

    folder = tmp_path_factory.mktemp("generative") / "shapes"
    make_shape_folder(folder, 12, seed=11)
    Collection.create(folder, embedder=embedder).index()
    shutil.copytree(TINY_DIT / "tokenizer", folder / ".vqret" / "tokenizer")
    shutil.copytree(TINY_DIT / "diffusion", folder / ".vqret" / "diffusion")
    return folder


def codes_state(work: Path) -> dict[str, Any]:
    store = Store(work / ".vqret")
    rows = store.read_table(["id", "path", "codes"]).to_pylist()
    return {**store_state(work / ".vqret"),
            "codes": sorted((r["path"], r["codes"] is not None) for r in rows)}


def test_tokenizer_encode_every_fault(generative, tmp_path):
    fault_loop(generative, lambda work: ["tokenizer", "encode", "--store", work / ".vqret",
                                         "--device", "cpu", "--quiet", "--commit-every", "6"],
               codes_state, tmp_path)


def checkpoint_state(folder: Path, name: str) -> str:
    """none, or loads: a checkpoint caught in the middle of its save (weights written, the
    sidecar not yet) still loads, and never fails to."""
    if not (folder / f"{name}.safetensors").exists():
        return "none"
    if name == "tokenizer":
        from vqret.tokenizer.checkpoint import load_checkpoint
    else:
        from vqret.diffusion.checkpoint import load_checkpoint
    load_checkpoint(folder)
    return "loads"


def saved_at_step(folder: Path, steps: int) -> None:
    """The next run left the model of the last step beside its train state."""
    info = json.loads(next(folder.glob("*.json")).read_text())
    assert info["step"] == steps and (folder / "train-state.pt").is_file(), info


def test_tokenizer_train_every_fault(tmp_path):
    template = tmp_path / "template"
    make_shape_folder(template / "images", 12, seed=12)
    fault_loop(template, lambda work: [
        "tokenizer", "train", "--images", work / "images", "--out", work / "ckpt",
        "--preset", "tiny", "--steps", "2", "-b", "4", "--device", "cpu", "--threads", "1",
        "--holdout", "0.2", "--no-cache"],
        lambda work: checkpoint_state(work / "ckpt", "tokenizer"), tmp_path,
        check_after=lambda work: saved_at_step(work / "ckpt", 2))


def test_diffusion_train_every_fault(generative, tmp_path):
    fault_loop(generative, lambda work: [
        "diffusion", "train", "--store", work / ".vqret", "--preset", "tiny", "--steps", "2",
        "-b", "4", "--out", work / "dit", "--device", "cpu"],
        lambda work: checkpoint_state(work / "dit", "diffusion"), tmp_path,
        check_after=lambda work: saved_at_step(work / "dit", 2))


def test_generate_every_fault(generative, tmp_path):
    def picture(work: Path) -> str:
        out = work / "out.png"
        if not out.exists():
            return "none"
        from PIL import Image

        with Image.open(out) as image:
            image.load()  # a half-written PNG fails here
            return f"{image.size}"

    fault_loop(generative, lambda work: [
        "generate", "a red circle", "--store", work / ".vqret", "--out", work / "out.png",
        "-n", "1", "--steps", "2", "--device", "cpu"], picture, tmp_path,
        only=lambda path: "out" in Path(path).name)


def test_serve_answers_a_failed_write_in_one_line_and_goes_on(generative, caplog):
    from starlette.testclient import TestClient
    from vqret.server.app import create_app

    app = create_app([str(generative / ".vqret")])
    ask = {"text": "a red circle", "k": 2, "generate": "always"}
    with TestClient(app) as client:
        with Faults(fail_at=1, only=lambda path: "generated" in path):
            failed = client.post("/api/search", json=ask)
        assert failed.status_code == 507, failed.text
        line = failed.json()["error"]
        assert "\n" not in line and "couldn't write a generated picture" in line
        assert NO_SPACE in line and "free space" in line
        again = client.post("/api/search", json=ask)
        assert again.status_code == 200 and again.json()["generated"], again.text
    logged = [r for r in caplog.records if r.name == "vqret.server"]
    assert logged and logged[0].exc_info is None and NO_SPACE in logged[0].getMessage()


def test_vqret_debug_shows_the_traceback_too(indexed, tmp_path, export_checked_elsewhere):
    folder = tmp_path / "photos"
    shutil.copytree(indexed, folder)
    args = ["index", str(folder), "--device", "cpu", "--workers", "0", "--quiet"]
    for debug, traced in (("1", True), ("0", False)):
        with Faults(fail_at=1, only=lambda path: "manifest" in path):
            result = CliRunner().invoke(app, args, env={"VQRET_DEBUG": debug})
        assert result.exit_code == 1 and ("Traceback" in result.stderr) == traced
        assert result.stderr.strip().splitlines()[-1].startswith("error: couldn't write the "
                                                                 "store's manifest")


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM,
                                  errno.EROFS])
def test_index_names_each_cause_and_the_next_run_completes(indexed, tmp_path, code,
                                                           export_checked_elsewhere):
    folder = tmp_path / "photos"
    shutil.copytree(indexed, folder)
    args = ["index", folder, "--device", "cpu", "--workers", "0", "--quiet"]
    with Faults(fail_at=1, error=code, only=lambda path: path.endswith(".parquet")):
        result = invoke(*args)
    assert_one_line(result, "a part of the store's image table", os.strerror(code).lower(),
                    "then run again: committed rows are kept")
    assert temp_files(folder) == []
    assert invoke(*args).exit_code == 0
    assert len(store_state(folder / ".vqret")["rows"]) == 8


def test_a_store_folder_removed_mid_run(indexed, tmp_path, tiny_clip,
                                        export_checked_elsewhere):
    folder = tmp_path / "photos"
    shutil.copytree(indexed, folder)
    store = folder / ".vqret"

    def remove_the_store(target: str) -> None:
        if Path(target).name == "manifest.json" and store.exists():
            shutil.rmtree(store)  # someone cleans up while `vqret index` runs

    args = ["index", folder, "--device", "cpu", "--workers", "0", "--quiet"]
    with Faults(after_rename=remove_the_store):
        result = invoke(*args)
    assert_one_line(result, "no such file or directory", "removed while vqret wrote")
    model = ["--model", tiny_clip[0], "--pretrained", tiny_clip[1]]
    assert invoke(*args, *model).exit_code == 0  # a new store, made anew
    assert len(store_state(store)["rows"]) == 8
