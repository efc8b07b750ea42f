"""Videos on the Ray engine: one video per actor task, the same rows as the local engine."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fixtures.videos import make_shape_video

ray = pytest.importorskip("ray")


def test_ray_engine_embeds_videos_on_its_actors_like_the_local_engine(tmp_path, embedder,
                                                                     tiny_clip):
    from vqret import Collection
    from vqret.retrieval.distributed import index_folder_with_ray
    from vqret.retrieval.distributed.embedding import RayEmbedder

    folder = tmp_path / "v"
    folder.mkdir()
    make_shape_video(folder / "clip.mp4")
    make_shape_video(folder / "other.mp4", ((0.0, 4.0, "yellow", "star"),
                                            (4.0, 8.0, "purple", "square")), seed=3)
    (folder / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 nope" * 50)
    local = Collection.create(folder, tmp_path / "local.vqret", embedder=embedder)
    local_report = local.index().to_dict()
    remote = Collection.create(folder, tmp_path / "ray.vqret", embedder=embedder)

    seen = []
    real = RayEmbedder.embed_videos

    def counted(self, names, every, on_frames=None):
        seen.append(len(names))
        yield from real(self, names, every, on_frames)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        RayEmbedder.embed_videos = counted
        report = index_folder_with_ray(remote.store, remote.store.spec, folder,
                                       text_embedder=embedder).to_dict()
    finally:
        RayEmbedder.embed_videos = real
        if started:
            ray.shutdown()
    assert seen == [3]  # the three videos went to the actors
    assert report["videos"] == local_report["videos"]
    assert report["videos"]["added"] == 2 and report["videos"]["segments"] == 5
    assert [f["path"] for f in report["failed"]] == ["broken.webm"]
    assert report["failed"] == local_report["failed"]

    def rows(collection):
        table = collection.store.read_table(["path", "t", "segment_start", "segment_end",
                                             "embedding"]).to_pylist()
        return sorted(table, key=lambda r: (r["path"], r["t"]))

    a, b = rows(local), rows(remote)
    assert [(r["path"], r["t"], r["segment_start"], r["segment_end"]) for r in a] == \
        [(r["path"], r["t"], r["segment_start"], r["segment_end"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert float(np.dot(x["embedding"], y["embedding"])) >= 0.999
