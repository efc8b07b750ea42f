import dataclasses
import itertools
import os
import sys
from pathlib import Path

import pytest
from vqret.retrieval import walk as walk_module
from vqret.retrieval.walk import FileEntry, walk_images

needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges")


def _touch(root: Path, relpath: str, data: bytes = b"x") -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _relpaths(root: Path, **kwargs) -> list[str]:
    # islice: a walk that loops forever fails the test instead of hanging it.
    return [e.relpath for e in itertools.islice(walk_images(root, **kwargs), 10_000)]


def test_skips_hidden_tool_folders_and_non_images(tmp_path):
    for relpath in [
        "b.PNG",
        "a.jpg",
        "notes.txt",
        "raw.cr2",
        "noext",
        ".hidden.jpg",
        ".cache/x.jpg",
        ".git/objects/y.jpg",
        "node_modules/pkg/z.jpg",
        "@eaDir/a.jpg/SYNOFILE_THUMB_XL.jpg",
        "__MACOSX/m.jpg",
        "$RECYCLE.BIN/r.jpg",
        "System Volume Information/s.jpg",
        "sub/d.jpeg",
        "sub/e.tiff",
        "sub/deeper/f.webp",
    ]:
        _touch(tmp_path, relpath)

    assert _relpaths(tmp_path) == [
        "a.jpg",
        "b.PNG",
        "sub/d.jpeg",
        "sub/deeper/f.webp",
        "sub/e.tiff",
    ]


def test_excluded_store_is_skipped_under_any_spelling(tmp_path):
    root = tmp_path / "photos"
    _touch(root, "keep.jpg")
    _touch(root, "vqret-store/thumbs/t.jpg")
    _touch(root, "other/o.jpg")

    assert _relpaths(root, exclude=[root / "vqret-store"]) == ["keep.jpg", "other/o.jpg"]
    # A non-normalised spelling of the same folder is still excluded.
    alias = root / "other" / ".." / "vqret-store"
    assert _relpaths(root, exclude=[alias]) == ["keep.jpg", "other/o.jpg"]
    # Single files can be excluded too.
    assert _relpaths(root, exclude=[root / "keep.jpg"]) == [
        "other/o.jpg",
        "vqret-store/thumbs/t.jpg",
    ]
    # Exclusions that don't exist (a store not created yet) are fine.
    assert len(_relpaths(root, exclude=[tmp_path / "missing"])) == 3


def test_spaces_and_non_ascii_names(tmp_path):
    _touch(tmp_path, "café/ünïcode 1.jpg")
    _touch(tmp_path, "with space/x y.webp")
    _touch(tmp_path, "日本/写真.png")
    assert _relpaths(tmp_path) == ["café/ünïcode 1.jpg", "with space/x y.webp", "日本/写真.png"]


def test_order_is_sorted_by_name_within_each_folder(tmp_path):
    for relpath in ["z.jpg", "m/2.jpg", "a.jpg", "m/1.jpg", "b/9.jpg", "c.jpg"]:
        _touch(tmp_path, relpath)  # created out of order on purpose
    expected = ["a.jpg", "b/9.jpg", "c.jpg", "m/1.jpg", "m/2.jpg", "z.jpg"]
    assert _relpaths(tmp_path) == expected
    assert _relpaths(tmp_path) == expected


def test_size_and_mtime(tmp_path):
    path = _touch(tmp_path, "dir/pic.jpg", b"0123456789")
    os.utime(path, ns=(1_600_000_000_123_456_789,) * 2)
    mtime_ns = os.stat(path).st_mtime_ns  # whatever resolution the file system keeps

    (entry,) = walk_images(tmp_path)
    assert entry == FileEntry(relpath="dir/pic.jpg", size=10, mtime_ns=mtime_ns)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.size = 0  # type: ignore[misc]


def test_deep_tree_does_not_recurse(tmp_path):
    depth = sys.getrecursionlimit() + 50
    deep = tmp_path
    for _ in range(depth):  # mkdir(parents=True) would itself recurse too deep
        deep = deep / "d"
        deep.mkdir()
    (deep / "bottom.jpg").write_bytes(b"x")
    try:
        assert _relpaths(tmp_path) == ["/".join(["d"] * depth + ["bottom.jpg"])]
    finally:
        # pytest's own tmp_path cleanup recurses and would fail on this tree.
        (deep / "bottom.jpg").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


def test_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(walk_images(tmp_path / "nope"))


@needs_symlinks
def test_symlink_loop_terminates(tmp_path):
    root = tmp_path / "root"
    _touch(root, "a.jpg")
    _touch(root, "sub/b.jpg")
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)  # sub/back -> root
    (root / "self").symlink_to(".", target_is_directory=True)
    errors = []

    found = _relpaths(root, on_error=lambda rel, cause: errors.append(rel))
    assert found == ["a.jpg", "sub/b.jpg"]
    assert sorted(errors) == ["self", "sub/back"]


@needs_symlinks
def test_symlinked_folders_and_files(tmp_path):
    outside = tmp_path / "outside"
    _touch(outside, "o.jpg", b"12345")
    root = tmp_path / "root"
    _touch(root, "a.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "alias.jpg").symlink_to(outside / "o.jpg")

    entries = {e.relpath: e for e in walk_images(root)}
    assert sorted(entries) == ["a.jpg", "alias.jpg", "linked/o.jpg"]
    assert entries["alias.jpg"].size == 5  # the target's size, not the link's

    assert _relpaths(root, follow_symlinks=False) == ["a.jpg"]


@needs_symlinks
def test_broken_symlink_is_reported_and_skipped(tmp_path):
    _touch(tmp_path, "a.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    errors = []
    assert _relpaths(tmp_path, on_error=lambda *args: errors.append(args)) == ["a.jpg"]
    assert errors == [("gone.jpg", "broken symlink")]
    assert _relpaths(tmp_path) == ["a.jpg"]  # no callback: still skipped silently


def test_unreadable_folder_is_reported_and_skipped(tmp_path, monkeypatch):
    _touch(tmp_path, "a.jpg")
    _touch(tmp_path, "locked/secret.jpg")
    _touch(tmp_path, "z/ok.jpg")
    real_scandir = os.scandir

    def scandir(path):  # simulated, since the tests may well run as root
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(walk_module.os, "scandir", scandir)
    errors = []
    assert _relpaths(tmp_path, on_error=lambda *args: errors.append(args)) == ["a.jpg", "z/ok.jpg"]
    assert errors == [("locked", "Permission denied")]


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="needs byte file names")
def test_non_utf8_names_are_skipped_not_fatal(tmp_path):
    _touch(tmp_path, "good.jpg")
    try:
        fd = os.open(os.fsencode(tmp_path) + b"/bad\xff.jpg", os.O_CREAT | os.O_WRONLY)
        os.close(fd)
        os.mkdir(os.fsencode(tmp_path) + b"/dir\xfe")
    except OSError:
        pytest.skip("file system refuses non-UTF-8 names")
    errors = []

    assert _relpaths(tmp_path, on_error=lambda *args: errors.append(args)) == ["good.jpg"]
    assert sorted(errors) == [
        ("bad\\xff.jpg", "file name is not valid UTF-8"),
        ("dir\\xfe", "folder name is not valid UTF-8"),
    ]
    for relpath, _ in errors:
        relpath.encode("utf-8")  # safe to print or log
