"""`vqret bench video` runs end to end on the fixture model and a small made-up video; the
rates are not asserted, only counts that hold whatever the speed."""

from __future__ import annotations

from conftest import run_json


def test_bench_video_samples_embeds_and_runs_the_naive_loop(tiny_clip):
    result = run_json("bench", "video", "--seconds", "8", "--size", "160x90", "--fps", "10",
                      "--baseline-seconds", "4", "--model", tiny_clip[0],
                      "--pretrained", tiny_clip[1])
    assert result["video"].startswith("160x90 h264 10 fps, 8 s")
    # one sample at least every 2 s (keyframes every 1 s): 4 of 8 s, and the sampler alone
    # finds the same frames
    assert 4 <= result["frames_embedded"] <= 8
    assert result["frames_sampled"] == result["frames_embedded"]
    assert 1 <= result["segments"] <= result["frames_embedded"]
    # the naive loop decodes every frame of its 4 s and embeds one every 2 s
    assert result["naive_frames_decoded"] == result["frames_in_baseline_decode"] == 40
    for key in ("x_real_time", "frames_embedded_per_s", "naive_x_real_time",
                "decode_only_x_real_time", "decode_every_frame_x_real_time"):
        assert result[key] > 0, key
