"""Videos: indexed at their moments (keyframes, scene changes, every N s), found at a time.

The videos are made here with PyAV from the drawn shapes the tiny model knows (fixtures/
videos.py): a blue square for 3 s, a red circle from 3 s to 5 s, a green triangle to 8 s.
"""

from __future__ import annotations

import io
import os
import re
import shutil

import numpy as np
import pytest
from conftest import run_cli, run_json
from fixtures.shapes import make_shape_folder
from fixtures.videos import make_shape_video
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


def index_args(folder, tiny_clip, *extra):
    model, weights = tiny_clip
    return ["index", str(folder), "--model", model, "--pretrained", weights, "--device", "cpu",
            *extra]


def video_rows(collection, path=None):
    rows = collection.store.read_table(["id", "path", "video_id", "t", "segment_start",
                                        "segment_end"]).to_pylist()
    rows = [r for r in rows if r["video_id"] is not None and (path is None or r["path"] == path)]
    return sorted(rows, key=lambda r: r["t"])


# ---- sampling ------------------------------------------------------------------------------


def test_samples_at_scene_cuts_and_at_least_every_n_seconds(tmp_path):
    from vqret.retrieval.video import sample_frames

    # a long GOP (100 frames = 16 s): the encoder's keyframes fall at the scene cuts only,
    # so the 2 s grid has to be filled by seeking and decoding forward
    path = make_shape_video(tmp_path / "long_gop.mp4", gop=100)
    info, samples = sample_frames(str(path), every=2.0, size=64)
    times = sorted(s.t for s in samples)
    assert info.duration == pytest.approx(8.0, abs=0.2)
    assert {3.0, 5.0} <= set(round(t, 2) for t in times)  # the cuts
    gaps = np.diff([*times, info.duration])
    assert times[0] == 0.0 and gaps.max() <= 2.5, times
    # a finer grid: more samples, still the cuts
    _, fine = sample_frames(str(path), every=0.5, size=64)
    fine_times = sorted(s.t for s in fine)
    assert len(fine_times) > len(times) and np.diff([*fine_times, 8.0]).max() <= 0.7


def test_near_identical_samples_merge_into_one_segment():
    from vqret.retrieval.video import merge_segments

    a, b = np.eye(4, dtype=np.float32)[:2]
    near = (a + 0.1 * b) / np.linalg.norm(a + 0.1 * b)  # cosine 0.995 to a
    segments = merge_segments([0.0, 2.0, 4.0, 6.0], np.stack([a, near, b, b]), end=8.0)
    assert [(s.start, s.end, s.frames) for s in segments] == [(0.0, 4.0, 2), (4.0, 8.0, 2)]
    assert segments[0].t in (0.0, 2.0) and segments[1].t in (4.0, 6.0)
    assert np.linalg.norm(segments[0].embedding) == pytest.approx(1.0, abs=1e-5)


# ---- the command line: index, search, failures -------------------------------------------


def test_cli_finds_the_moment_and_reports_broken_videos(tmp_path, tiny_clip):
    folder = tmp_path / "media"
    folder.mkdir()
    # stills of other classes than the video's red circle
    drawn = make_shape_folder(folder, 12, seed=77)
    for path, _, color, shape in drawn:
        if (color, shape) == ("red", "circle"):
            path.unlink()
    make_shape_video(folder / "clip.mp4")
    (folder / "garbage.mkv").write_bytes(b"\x1aE\xdf\xa3 not really a matroska file" * 40)
    whole = make_shape_video(tmp_path / "whole.mp4", faststart=True).read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    report = run_json(*index_args(folder, tiny_clip))
    failed = {f["path"]: f["error"] for f in report["failed"]}
    assert set(failed) == {"garbage.mkv", "truncated.mp4"}, failed
    assert all(cause.strip() and "\n" not in cause for cause in failed.values())
    assert report["videos"]["added"] == 1 and report["videos"]["failed"] == 2
    assert report["videos"]["segments"] == 3  # square, circle, triangle
    assert report["added"] == len(list(folder.glob("*.png")))  # the stills, as ever

    hits = run_json("search", "a red circle", "-k", "3", cwd=folder)
    assert hits[0]["path"] == "clip.mp4"
    start, end = hits[0]["segment"]
    assert start <= hits[0]["t"] <= end
    assert 3.0 <= hits[0]["t"] < 5.0 and start == pytest.approx(3.0, abs=0.2)
    assert end == pytest.approx(5.0, abs=0.2)

    files = run_cli("search", "a red circle", "-k", "1", "-f", cwd=folder).stdout.split()
    assert files == [f"{folder / 'clip.mp4'}#t={hits[0]['t']:.1f}"]
    table = run_cli("search", "a red circle", "-k", "1", cwd=folder).stdout
    assert "clip.mp4 @ 00:03" in table

    # every row of a video, or only its best moment; video rows filter like any row
    every = run_json("search", "a blue square", "-k", "50", cwd=folder)
    assert sum(h["path"] == "clip.mp4" for h in every) == 3
    best = run_json("search", "a blue square", "-k", "50", "--per-video", "1", cwd=folder)
    assert [h["path"] for h in best].count("clip.mp4") == 1
    only_video = run_json("search", "a green triangle", "--type", "mp4", "--where",
                          "t >= 4", cwd=folder)
    assert {h["path"] for h in only_video} == {"clip.mp4"}
    assert only_video[0]["t"] >= 5.0  # the triangle

    grid = tmp_path / "grid.png"
    run_cli("search", "a red circle", "-k", "1", "--grid", str(grid), cwd=folder)
    cell = np.asarray(Image.open(grid).convert("RGB"))
    red = (cell[..., 0] > 180) & (cell[..., 1] < 80) & (cell[..., 2] < 80)
    assert red.sum() > 100  # the frame at t, not an "unreadable" tile


def test_a_terminal_sees_the_video_frames_counted_as_they_are_embedded(tmp_path, tiny_clip):
    folder = tmp_path / "media"
    folder.mkdir()
    make_shape_folder(folder, 3, seed=5)
    make_shape_video(folder / "clip.mp4")
    # FORCE_COLOR and a TERM that isn't dumb: rich draws its bars as on a terminal, into the
    # captured stderr
    terminal = {"FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "160"}
    proc = run_cli(*index_args(folder, tiny_clip), env=terminal)
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stderr)
    frames = int(re.search(r"videos: .* (\d+) frames embedded", proc.stdout).group(1))
    assert frames > 0
    counts = [int(n) for n in re.findall(r"embedding video frames\W+(\d+)/\?", drawn)]
    assert counts and counts[-1] == frames  # the last frame drawn is the summary's count
    assert counts == sorted(counts) and "frames/s" in drawn
    assert re.search(r"embedding\W+3/3 ", drawn)  # the images' own bar, as before


# ---- incremental: renamed, re-encoded, killed, removed -------------------------------------


def test_renamed_keeps_ids_changed_replaces_rows_killed_run_resumes(tmp_path, embedder,
                                                                   monkeypatch):
    from vqret import Collection
    from vqret.retrieval import video_index

    folder = tmp_path / "videos"
    folder.mkdir()
    make_shape_video(folder / "a.mp4")
    collection = Collection.create(folder, embedder=embedder)
    first = collection.index().videos
    assert first["added"] == 1 and first["segments"] == 3
    before = video_rows(collection, "a.mp4")
    assert len({r["video_id"] for r in before}) == 1

    # renamed: the same rows under the new name, nothing embedded
    (folder / "a.mp4").rename(folder / "b.mp4")
    renamed = collection.index().videos
    assert renamed["renamed"] == 1 and renamed["embedded_frames"] == 0
    after = video_rows(collection, "b.mp4")
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert [r["video_id"] for r in after] == [r["video_id"] for r in before]
    assert video_rows(collection, "a.mp4") == []

    # touched (same bytes, new mtime): nothing embedded, the same rows
    os.utime(folder / "b.mp4", ns=(1_700_000_000_000_000_000,) * 2)
    touched = collection.index().videos
    assert touched["unchanged"] == 1 and touched["embedded_frames"] == 0
    assert [r["id"] for r in video_rows(collection, "b.mp4")] == [r["id"] for r in before]
    assert collection.info()["videos"] == {"videos": 1, "moments": 3}

    # re-encoded with other scenes: its rows replaced (the same video id)
    make_shape_video(folder / "b.mp4", ((0.0, 4.0, "yellow", "star"),
                                        (4.0, 8.0, "purple", "square")), seed=5)
    changed = collection.index().videos
    assert changed["updated"] == 1 and changed["segments"] == 2
    now = video_rows(collection, "b.mp4")
    assert len(now) == 2 and not {r["id"] for r in now} & {r["id"] for r in before}
    assert {r["video_id"] for r in now} == {before[0]["video_id"]}
    hit = collection.search("a yellow star", k=1, per_video=1)[0]
    assert hit.path == "b.mp4" and hit.segment[0] <= hit.t < 4.0
    assert hit.to_dict()["segment"] == [pytest.approx(0.0), pytest.approx(4.0, abs=0.2)]

    # killed while embedding the second of two new videos: the first is committed
    make_shape_video(folder / "c.mp4", seed=6)
    make_shape_video(folder / "d.mp4", ((0.0, 4.0, "orange", "star"),
                                        (4.0, 8.0, "blue", "circle")), seed=7)
    real = video_index.embed_video
    calls = []

    def dies_on_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(video_index, "embed_video", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        collection.index()
    monkeypatch.setattr(video_index, "embed_video", real)
    collection.store.refresh()
    assert len(video_rows(collection, "c.mp4")) == 3 and video_rows(collection, "d.mp4") == []
    resumed = collection.index().videos
    assert resumed["added"] == 1 and resumed["unchanged"] == 2  # b and c
    assert len(video_rows(collection, "d.mp4")) == 2

    # removed: its rows go
    (folder / "c.mp4").unlink()
    assert collection.index().videos["removed"] == 1
    assert video_rows(collection, "c.mp4") == []
    assert {r["path"] for r in video_rows(collection)} == {"b.mp4", "d.mp4"}


# ---- the server: the frame as thumbnail, the original with ranges --------------------------


def test_server_shows_the_frame_and_serves_the_video_in_ranges(tmp_path, embedder):
    from starlette.testclient import TestClient
    from vqret import Collection
    from vqret.server.app import create_app

    folder = tmp_path / "served"
    folder.mkdir()
    make_shape_video(folder / "clip.mp4")
    shutil.copy(folder / "clip.mp4", folder / "copy.mp4")  # a copy: rows copied, not embedded
    collection = Collection.create(folder, embedder=embedder)
    report = collection.index().videos
    assert report["added"] == 2 and report["embedded_frames"] > 0
    app = create_app([collection])
    try:
        with TestClient(app) as client:
            found = client.get("/api/search", params={"q": "a red circle", "k": 5,
                                                  "per_video": 1}).json()["results"]
            assert {r["path"] for r in found} == {"clip.mp4", "copy.mp4"} and len(found) == 2
            top = found[0]
            assert 3.0 <= top["t"] < 5.0 and top["segment"][0] <= top["t"]
            thumb = client.get(top["thumbnail_url"])
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
            pixels = np.asarray(Image.open(io.BytesIO(thumb.content)).convert("RGB"), float)
            red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
            assert red.mean() > 0.05  # the red circle's frame, not the first one
            size = (folder / top["path"]).stat().st_size
            part = client.get(top["original_url"], headers={"Range": "bytes=100-199"})
            assert part.status_code == 206 and part.headers["content-type"] == "video/mp4"
            assert part.content == (folder / top["path"]).read_bytes()[100:200]
            assert part.headers["content-range"] == f"bytes 100-199/{size}"
    finally:
        app.state.service.close()


def test_an_engine_without_a_frame_path_embeds_videos_with_its_local_model(tmp_path, embedder):
    """The Ray engine's embedder takes image files only: its local model (the one sidecar
    captions use) embeds the frames, as the local engine's would."""
    from types import SimpleNamespace

    from vqret import Collection
    from vqret.retrieval.video_index import sync_videos

    folder = tmp_path / "v"
    folder.mkdir()
    make_shape_video(folder / "clip.mp4")
    collection = Collection.create(folder, embedder=embedder)
    cluster_like = SimpleNamespace(text_embedder=embedder)  # no encode_pixels
    with collection.store.writer() as writer:
        report = sync_videos(collection.store, cluster_like, folder, writer)
    assert report.added == 1 and report.segments == 3 and not report.failed
