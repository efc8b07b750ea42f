"""The product as a user runs it: `vqret index` and `vqret search` in fresh processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_json
from PIL import Image
from vqret.retrieval.store import Store


def index_args(folder: Path, tiny_clip, *extra: str) -> list[str]:
    model, weights = tiny_clip
    return ["index", str(folder), "--model", model, "--pretrained", weights, "--device", "cpu",
            *extra]


def precision_at_5(results: list[dict], color: str, shape: str) -> float:
    top = results[:5]
    return sum(f"_{color}_{shape}." in r["path"] for r in top) / 5


def cli_command(*args: str, prelude: str = "") -> list[str]:
    """`vqret ARGS` in a fresh interpreter that runs `prelude` first: a hook or a guard the
    test installs in the CLI's own process, so that it controls when things happen there."""
    run = ("\nimport runpy, sys\nsys.argv = ['vqret', *sys.argv[1:]]\n"
           "runpy.run_module('vqret.cli.main', run_name='__main__')\n")
    return [sys.executable, "-c", prelude + run, *args]


def run_cli_with(prelude: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args, prelude=prelude), capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


# Once 40 rows are committed, the indexer's next commit stops just before its manifest
# replaces the old one (its part file written, not yet listed): the worst moment to die. It
# says how many rows are committed and waits there for the test, which kills it.
HOLD_BEFORE_PUBLISHING = """
import os, sys
from pathlib import Path
from vqret.retrieval.store import MANIFEST, StoreWriter

commit, replace = StoreWriter.commit, os.replace
armed = []

def commit_or_arm(self, add=None, *args, **kwargs):
    if not armed and add is not None and add.num_rows and len(self.store) >= 40:
        armed.append(len(self.store))
    return commit(self, add, *args, **kwargs)

def replace_or_hold(src, dst, *args, **kwargs):
    if armed and Path(dst).name == MANIFEST:
        print(f"holding {armed[0]}", flush=True)
        sys.stdin.readline()
        os._exit(1)  # let go without a kill: die mid-commit all the same
    return replace(src, dst, *args, **kwargs)

StoreWriter.commit, os.replace = commit_or_arm, replace_or_hold
"""

# Any name lookup or internet connection ends the process at once, loudly, whatever the code
# around it would catch: a run that passes under it never tried the network.
NO_NETWORK = """
import os, socket, sys

def no_network(event, args):
    lookup = event == "socket.getaddrinfo" or event.startswith("socket.gethostby")
    connect = event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6)
    if lookup or connect:
        os.write(2, f"network attempt: {event} {args[-1] if connect else args}\\n".encode())
        os._exit(97)

sys.addaudithook(no_network)
"""


def test_index_then_search_by_text_and_image(shapes_folder, tiny_clip, tmp_path):
    folder, drawn = shapes_folder
    report = run_json(*index_args(folder, tiny_clip))
    assert report["added"] == report["embedded"] == len(drawn) == 120
    assert report["failed"] == [] and report["removed"] == 0

    # precision@5 on images the model never saw: through the CLI for "a red circle", and for
    # every class through the same store opened in-process (24 CLI starts would be slow)
    red_circle = run_json("search", "a red circle", "-k", "5", cwd=folder)
    assert [r["rank"] for r in red_circle] == [1, 2, 3, 4, 5]
    assert all(red_circle[i]["score"] >= red_circle[i + 1]["score"] for i in range(4))
    assert precision_at_5(red_circle, "red", "circle") >= 0.8
    from vqret import Collection

    collection = Collection.open(folder, device="cpu")
    scores = []
    for color, shape in sorted({(c, s) for _, _, c, s in drawn}):
        results = [r.to_dict() for r in collection.search(text=f"a {color} {shape}", k=5)]
        scores.append(precision_at_5(results, color, shape))
    assert np.mean(scores) >= 0.8, scores

    # an image query returns that image first, with cosine ~1
    query = drawn[7][0]
    by_image = run_json("search", "--image", str(query), "-k", "3", "--store",
                        str(folder / ".vqret"))
    assert by_image[0]["path"] == query.name
    assert by_image[0]["score"] == pytest.approx(1.0, abs=1e-3)

    # -f prints paths only, resolvable from anywhere
    paths = run_cli("search", "a blue square", "-k", "4", "-f", cwd=folder).stdout.split("\n")
    paths = [p for p in paths if p]
    assert len(paths) == 4 and all(Path(p).is_file() for p in paths)

    # the table names rank, score and path
    table = run_cli("search", "a blue square", "-k", "2", cwd=folder).stdout
    assert "rank" in table and "score" in table and "_blue_" in table

    # k larger than the collection returns the whole collection
    assert len(run_json("search", "a green star", "-k", "1000", cwd=folder)) == 120

    # --grid writes one picture of the results
    grid = tmp_path / "grid.png"
    run_cli("search", "a red circle", "-k", "6", "--grid", str(grid), cwd=folder)
    picture = Image.open(grid)
    assert picture.width > 3 * 100 and picture.height > 100


def test_incremental_add_modify_delete_rename(shapes_folder, tiny_clip, tmp_path):
    folder, drawn = shapes_folder
    run_json(*index_args(folder, tiny_clip))
    before = Store(folder / ".vqret").read_table(["id", "path"]).to_pylist()
    id_of = {r["path"]: r["id"] for r in before}

    again = run_json("index", str(folder))  # the store's own model is reused
    assert again["unchanged"] == 120 and again["embedded"] == 0

    renamed_src, renamed_dst = drawn[0][0], folder / "sub dir" / "renamed ü.png"
    renamed_dst.parent.mkdir()
    shutil.move(renamed_src, renamed_dst)
    shutil.copy(drawn[1][0], folder / "copy.png")  # a duplicate: reused, not embedded
    drawn[2][0].unlink()  # deleted
    # modified: same name, new picture
    Image.new("RGB", (64, 64), (10, 200, 10)).save(drawn[3][0])
    from fixtures.shapes import make_shape_folder

    new_folder = tmp_path / "new"
    new_folder.mkdir()
    for path, *_ in make_shape_folder(new_folder, 3, seed=99):
        shutil.move(path, folder / f"new_{path.name}")

    report = run_json("index", str(folder))
    assert report["renamed"] == 1
    assert report["removed"] == 1
    assert report["updated"] == 1
    assert report["added"] == 4  # 3 new + 1 copy
    assert report["embedded"] == 4  # 3 new + 1 modified: not the rename, not the copy
    assert report["unchanged"] == 120 - 3  # all but the renamed, deleted and modified

    rows = {r["path"]: r for r in Store(folder / ".vqret").read_table().to_pylist()}
    assert len(rows) == 120 + 3 + 1 - 1
    # the renamed file kept its id and its embedding; the copy shares the embedding
    assert rows["sub dir/renamed ü.png"]["id"] == id_of[renamed_src.name]
    assert rows["copy.png"]["embedding"] == rows[drawn[1][0].name]["embedding"]
    assert rows["copy.png"]["id"] != rows[drawn[1][0].name]["id"]
    assert rows[drawn[3][0].name]["id"] == id_of[drawn[3][0].name]
    assert drawn[2][0].name not in rows

    # search still maps ids to the right files after all that
    hit = run_json("search", "--image", str(renamed_dst), "-k", "1", cwd=folder)[0]
    assert hit["path"] == "sub dir/renamed ü.png"


def _png_claiming(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_corrupt_and_odd_files(shapes_folder, tiny_clip):
    folder, drawn = shapes_folder
    odd = folder / "odd"
    odd.mkdir()
    good_jpeg = odd / "good.jpg"
    Image.open(drawn[0][0]).convert("RGB").save(good_jpeg, quality=95)
    data = good_jpeg.read_bytes()
    (odd / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "notes.jpg").write_text("this is not an image")
    _png_claiming(odd / "huge.png", 40_000, 40_000)
    # odd but valid: must be indexed
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(odd / "cmyk.jpg")
    gradient = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(gradient).save(odd / "deep16.png")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (16, 16, 48, 48))
    palette.info["transparency"] = 0
    palette.save(odd / "palette_alpha.png", transparency=0)
    frames = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(odd / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    (folder / ".hidden.png").write_bytes(drawn[1][0].read_bytes())
    (folder / "node_modules").mkdir()
    shutil.copy(drawn[1][0], folder / "node_modules" / "skipme.png")

    proc = run_cli(*index_args(folder, tiny_clip, "--json"))
    report = json.loads(proc.stdout)
    failed = {f["path"]: f["error"] for f in report["failed"]}
    assert set(failed) == {"odd/truncated.jpg", "odd/empty.jpg", "odd/notes.jpg", "odd/huge.png"}
    assert "too many pixels" in failed["odd/huge.png"]
    assert "empty" in failed["odd/empty.jpg"]
    # one line per bad file on stderr, naming it
    for bad in failed:
        assert any(bad in line for line in proc.stderr.splitlines())
    paths = set(Store(folder / ".vqret").read_table(["path"]).column("path").to_pylist())
    assert {"odd/good.jpg", "odd/cmyk.jpg", "odd/deep16.png", "odd/palette_alpha.png",
            "odd/animated.gif"} <= paths
    assert len(paths) == 120 + 5
    assert not any("skipme" in p or "hidden" in p for p in paths)

    info = run_cli("info", "--store", str(folder / ".vqret")).stdout
    assert "odd/truncated.jpg" in info and "4" in info

    # a bad file that gets fixed is picked up on the next run
    shutil.copy(good_jpeg, odd / "truncated.jpg")
    again = run_json("index", str(folder))
    assert again["added"] == 1 and len(again["failed"]) == 3


def test_killed_run_resumes_without_losing_commits(tmp_path, tiny_clip):
    from fixtures.shapes import make_shape_folder

    folder = tmp_path / "many"
    folder.mkdir()
    make_shape_folder(folder, 100, seed=7)
    store = folder / ".vqret"
    cmd = cli_command(*index_args(folder, tiny_clip, "--batch-size", "4", "--commit-every", "4",
                                  "--workers", "0", "--quiet"), prelude=HOLD_BEFORE_PUBLISHING)
    log = tmp_path / "indexer.log"
    with open(log, "w") as errors:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=errors, text=True)
    try:
        # blocks until the indexer holds, or exits without reaching the hold
        line = next((out for out in proc.stdout if out.startswith("holding ")), "")
        assert line, f"the indexer never held:\n{log.read_text()}"
        committed = int(line.split()[1])
        assert proc.poll() is None
        # a reader during the run sees the last committed state, not the half-made commit
        during = Store(store)
        assert during.read_table().num_rows == len(during) == committed >= 40
        unlisted = {f.name for f in (store / "images").iterdir()} - set(during.parts())
        assert unlisted, "the held commit should have written a part the manifest doesn't list"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()

    survived = Store(store)
    kept = survived.read_table().num_rows
    assert kept == len(survived) == committed
    report = run_json("index", str(folder))
    assert report["unchanged"] == kept
    assert report["added"] == report["embedded"] == 100 - kept
    resumed = Store(store)
    assert len(resumed) == 100
    # the next writer removed what the killed one left half-made
    assert {f.name for f in (store / "images").iterdir()} == set(resumed.parts())
    assert not any(f.name.startswith(".tmp-") for f in store.iterdir())


def test_second_indexer_is_refused_while_first_runs(tmp_path, tiny_clip):
    folder = tmp_path / "imgs"
    folder.mkdir()
    from fixtures.shapes import make_shape_folder

    make_shape_folder(folder, 8, seed=3)
    run_json(*index_args(folder, tiny_clip))
    holder = subprocess.Popen(  # another `vqret index`, held mid-write until the test lets go
        [sys.executable, "-c", "import sys\n"
         "from vqret.retrieval.store import Store\n"
         "store = Store(sys.argv[2])\n"
         "sys.argv = ['vqret', 'index', sys.argv[1]]  # as the CLI's process has it\n"
         "with store.writer():\n"
         "    print('locked', flush=True); sys.stdin.readline()\n",
         str(folder), str(folder / ".vqret")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_cli("index", str(folder), check=False)
        holder.stdin.close()  # the holder leaves its writer block and exits
        assert holder.wait(timeout=600) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        holder.stdout.close()
    assert proc.returncode == 1
    assert f"another writer (`vqret index`, pid {holder.pid}) is writing" in proc.stderr
    assert "Traceback" not in proc.stderr
    # refused because of the holder, not for another reason: with it gone, the same run works
    assert run_json("index", str(folder))["unchanged"] == 8


def test_offline_pretrained_weights_fail_fast_with_a_clear_message(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    args = ("index", str(folder), "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k")
    # not in the cache, whatever this machine has cached
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    # "fast" = without trying the network: any attempt would end the run with exit 97
    proc = run_cli_with(NO_NETWORK, *args, env={**empty_cache, "HF_HUB_OFFLINE": "1"})
    assert "network attempt" not in proc.stderr
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message
    assert "--pretrained /path/to/" in message
    assert not (folder / ".vqret").exists()
    # the guard is live: online, the same run does try the network (and is stopped there)
    online = run_cli_with(NO_NETWORK, *args, env={**empty_cache, "HF_HUB_OFFLINE": "0"})
    assert online.returncode == 97 and "network attempt" in online.stderr


def test_search_without_store_and_empty_query(tmp_path, shapes_folder, tiny_clip):
    proc = run_cli("search", "a red circle", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "vqret index" in proc.stderr
    folder, _ = shapes_folder
    run_json(*index_args(folder, tiny_clip))
    proc = run_cli("search", "  ", cwd=folder, check=False)
    assert proc.returncode == 2 and "empty query" in proc.stderr  # bad input: exit 2


def test_other_model_is_refused_unless_rebuild(tmp_path, tiny_clip):
    from fixtures.shapes import make_shape_folder

    folder = tmp_path / "imgs"
    folder.mkdir()
    make_shape_folder(folder, 6, seed=5)
    run_json(*index_args(folder, tiny_clip))
    model, _ = tiny_clip
    proc = run_cli("index", str(folder), "--model", model, "--pretrained", "none",
                   check=False)
    assert proc.returncode == 1 and "--rebuild" in proc.stderr
    report = run_json("index", str(folder), "--model", model, "--pretrained", "none",
                      "--rebuild")
    assert report["embedded"] == 6
    assert Store(folder / ".vqret").spec.weights_id == "none"
