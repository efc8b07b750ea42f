"""recall@k as CLIP_benchmark defines it, the caption formats, and `vqret bench recall`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import run_json
from vqret.retrieval.captions import CaptionFormatError, read_captions
from vqret.retrieval.recall import recall_at_k


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_hand_computed_with_several_captions_per_image():
    images = unit(np.eye(3))  # image i points along axis i
    # captions 0,1 belong to image 0; caption 2 to image 1; caption 3 to image 2
    texts = unit([[1, 0.1, 0], [0.2, 1, 0], [0, 1, 0.1], [0.9, 0, 0.5]])
    owner = [0, 0, 1, 2]
    m = recall_at_k(texts, images, owner, ks=(1, 2, 3))
    # t2i top-1: caption0 -> img0 (hit), caption1 -> img1 (miss), caption2 -> img1 (hit),
    # caption3 -> img0 (miss; img2 is second)
    assert m["text_to_image_R@1"] == pytest.approx(2 / 4)
    assert m["text_to_image_R@2"] == pytest.approx(4 / 4)
    # i2t: image0's best text is caption0 (hit); image1's best is caption1 (1.0 > 0.995...)?
    scores = texts @ images.T
    best_text = scores.argmax(axis=0)
    expected = np.mean([owner[best_text[i]] == i for i in range(3)])
    assert m["image_to_text_R@1"] == pytest.approx(expected)
    # k larger than the gallery: everything is retrieved
    assert m["text_to_image_R@3"] == 1.0 and m["image_to_text_R@3"] == 1.0
    big = recall_at_k(texts, images, owner, ks=(50,))
    assert big["text_to_image_R@50"] == 1.0 and big["image_to_text_R@50"] == 1.0


def test_ties_follow_torch_topk_like_clip_benchmark():
    # all four images score the same for the caption: which one is "top-1" is torch.topk's
    images = unit(np.tile([[1.0, 0.0]], (4, 1)))
    texts = unit([[1.0, 0.0]])
    picked = int(torch.topk(torch.tensor(texts @ images.T), 1).indices[0, 0])
    for owner in range(4):
        m = recall_at_k(texts, images, [owner], ks=(1, 4))
        assert m["text_to_image_R@1"] == float(owner == picked)
        assert m["text_to_image_R@4"] == 1.0


def brute_force(texts, images, owner, k):
    """Independent implementation: rank by sorting, no ties in random data."""
    scores = texts @ images.T
    t2i = [owner[t] in np.argsort(-scores[t])[:k] for t in range(len(texts))]
    i2t = []
    for i in range(len(images)):
        top = np.argsort(-scores[:, i])[:k]
        i2t.append(any(owner[t] == i for t in top))
    return np.mean(t2i), np.mean(i2t)


def test_agrees_with_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(40, 16)))
    owner = np.repeat(np.arange(40), 3)  # 3 captions each
    texts = unit(images[owner] + 0.9 * rng.normal(size=(120, 16)))
    m = recall_at_k(texts, images, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        t2i, i2t = brute_force(texts, images, owner, k)
        assert m[f"text_to_image_R@{k}"] == pytest.approx(t2i)
        assert m[f"image_to_text_R@{k}"] == pytest.approx(i2t)
    assert 0 < m["text_to_image_R@1"] < m["text_to_image_R@10"] < 1


def test_bad_links_are_refused():
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(unit([[1, 0]]), unit([[1, 0]]), [3])


# ---- caption formats ------------------------------------------------------------------------


def test_three_caption_formats(tmp_path):
    coco = {
        "images": [{"id": 2, "file_name": "b.jpg"}, {"id": 1, "file_name": "a.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "first of a"},
            {"image_id": 2, "id": 11, "caption": "only b"},
            {"image_id": 1, "id": 12, "caption": "second of a "},
        ],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    c = read_captions(tmp_path / "captions_val2017.json")
    assert c.images == ["a.jpg", "b.jpg"]
    assert c.captions == ["first of a", "second of a", "only b"]
    assert c.caption_image == [0, 0, 1]

    karpathy = {"images": [
        {"filename": "x.jpg", "filepath": "val2014", "split": "test",
         "sentences": [{"raw": "x one"}, {"raw": "x two"}]},
        {"filename": "y.jpg", "split": "train", "sentences": [{"raw": "y"}]},
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    k = read_captions(tmp_path / "dataset_coco.json", split="test")
    assert k.images == ["val2014/x.jpg"] and k.caption_image == [0, 0]
    assert len(read_captions(tmp_path / "dataset_coco.json").images) == 2

    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["image", "caption"], ["p.png", "p1"], ["q.png", "q1"], ["p.png", "p2"]])
    r = read_captions(tmp_path / "caps.csv")
    assert r.images == ["p.png", "q.png"]
    assert r.captions == ["p1", "p2", "q1"] and r.caption_image == [0, 0, 1]
    (tmp_path / "caps.jsonl").write_text('{"image": "p.png", "caption": "p1"}\n\n'
                                        '{"image": "q.png", "caption": "q1"}\n')
    assert read_captions(tmp_path / "caps.jsonl").captions == ["p1", "q1"]

    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(CaptionFormatError, match="not COCO"):
        read_captions(tmp_path / "other.json")


def test_bench_recall_on_the_fixture_is_far_above_chance(shapes_folder, tiny_clip, tmp_path):
    folder, drawn = shapes_folder
    rows = [{"image": p.name, "caption": c} for p, c, *_ in drawn[:48]]
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    model, weights = tiny_clip
    result = run_json("bench", "recall", "--captions", str(jsonl), "--images", str(folder),
                      "--model", model, "--pretrained", weights, "--device", "cpu",
                      "--index", "hnsw")
    assert result["images"] == 48 and result["captions"] == 48
    # 24 classes, 2 images each: chance R@5 is about 5/48 ~ 10%
    assert result["exact"]["text_to_image_R@5"] >= 60
    assert result["exact"]["image_to_text_R@5"] >= 60
    assert result["index"] == "hnsw"
    assert set(result["ann"]) == set(result["exact"])
    # a tuned index stays close to exact search (R@1 is left out: each caption has a twin
    # image of its class, so the top-1 between near-equal scores is a coin flip)
    for name in ("text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@10"):
        assert abs(result["ann"][name] - result["exact"][name]) <= 10
