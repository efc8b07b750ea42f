"""The VQ-VAE tokenizer: quantizers, configs, metrics, and a tiny model trained on drawn shapes.

Everything runs on the CPU in a few seconds per test; one module-scoped model (the tiny
preset, ~300 steps on drawn shapes) is shared by the tests that need a trained tokenizer.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures.shapes import make_shape_folder
from vqret.tokenizer.api import Tokenizer
from vqret.tokenizer.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    read_checkpoint_info,
    tokenizer_id,
)
from vqret.tokenizer.config import PRESETS, TokenizerConfig, add_config, get_config
from vqret.tokenizer.data import decode_images, split_holdout
from vqret.tokenizer.evaluate import evaluate
from vqret.tokenizer.metrics import (
    bytes_per_image,
    codebook_usage,
    entropy_bits,
    perplexity,
    psnr,
    ssim,
)
from vqret.tokenizer.model import create_model
from vqret.tokenizer.quantizers import FSQ, VectorQuantizer, kmeans
from vqret.tokenizer.train import train

# Measured with this fixture (train seeds 0-3): after TRAIN_STEPS steps the tiny preset
# reaches 22.6-23.6 dB PSNR on unseen drawings and uses 100% of its 64 codes on them; an
# untrained model scores ~7 dB. The thresholds leave ~2.5 dB and a quarter of the codebook
# of margin for other CPUs, thread counts and library versions.
TRAIN_STEPS = 300
PSNR_THRESHOLD = 20.0
USAGE_THRESHOLD = 0.75


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """(checkpoint folder, TrainResult, held-out folder): the tiny preset on drawn shapes."""
    root = tmp_path_factory.mktemp("tokenizer")
    make_shape_folder(root / "train", 240, seed=11)
    make_shape_folder(root / "unseen", 48, seed=12)
    torch.manual_seed(0)
    result = train(
        root / "train",
        root / "ckpt",
        preset="tiny",
        steps=TRAIN_STEPS,
        batch_size=16,
        lr=2e-3,
        holdout=0.1,
        device="cpu",
        eval_every=TRAIN_STEPS,
        threads=1,  # tiny tensors: more threads only add synchronisation
    )
    return root / "ckpt", result, root / "unseen"


# ------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 62}, "multiple of the downsampling factor"),
        ({"codebook_size": 70000}, "uint16"),
        ({"codebook_size": 1}, "codebook_size"),
        ({"quantizer": "rvq"}, "quantizer must be one of"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"channels": 12}, "divisible by norm_groups"),
        ({"codebook_dim": 1}, "l2_normalize needs codebook_dim >= 2"),
        ({"dead_code_threshold": 2.0}, "dead_code_threshold"),
        ({"quantizer": "fsq", "fsq_levels": (1, 5)}, "fsq_levels"),
        ({"quantizer": "fsq", "fsq_levels": (64, 64, 64)}, "uint16"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"patch_size": 0}, "patch_size"),
        ({"bogus": 1}, "unknown tokenizer config keys"),
    ],
)
def test_config_errors_are_early_and_clear(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("cpu", **overrides)


def test_presets_and_json_configs(tmp_path):
    cpu = PRESETS["cpu"]
    assert (cpu.image_size, cpu.grid_size, cpu.num_codes) == (64, 16, 1024)
    assert PRESETS["cpu-fsq"].num_codes == 8 * 5 * 5 * 5
    assert PRESETS["gpu"].image_size in (128, 256)
    for name in PRESETS:  # every preset builds
        create_model(name)
    with pytest.raises(ValueError, match="unknown tokenizer preset 'nope'.*cpu"):
        get_config("nope")

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**PRESETS["tiny"].to_dict(), "name": "x", "codebook_size": 32}))
    config = add_config(path)
    assert config.name == "x" and get_config("x").codebook_size == 32
    assert TokenizerConfig.from_dict(json.loads(config.to_json())) == config
    (tmp_path / "bad.json").write_text('{"image_size": 64, "codebok_size": 3}')
    with pytest.raises(ValueError, match="codebok_size"):
        get_config(tmp_path / "bad.json")


def test_model_shapes_and_inverse_path():
    model = create_model("tiny").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, indices, aux = model(x)
    assert recon.shape == x.shape and indices.shape == (2, 8, 8)
    assert set(aux) >= {"loss", "commitment_loss", "perplexity", "usage"}
    quantized, same, _ = model.encode(x)
    assert torch.equal(same, indices)
    # indices -> codes -> image is the decoder's input exactly
    assert torch.allclose(model.indices_to_codes(indices), quantized, atol=1e-6)
    assert torch.allclose(model.decode_indices(indices), recon, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Quantizers
# ------------------------------------------------------------------------------------------


def test_straight_through_reaches_the_encoder():
    vq = VectorQuantizer(8, 16, codebook_dim=4)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    quantized, _, aux = vq(z)
    (quantized.pow(2).mean() + aux["loss"]).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert not vq.codebook.requires_grad  # the codebook moves by EMA, not by gradient


def test_kmeans_init_and_ema_follow_the_data():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(4, 3), dim=1)
    x = F.normalize(centers.repeat_interleave(64, 0) + 0.01 * torch.randn(256, 3), dim=1)
    found, counts = kmeans(x, 4, 10, spherical=True)
    # every true centre has a centroid within a small angle
    assert (centers @ found.t()).max(dim=1).values.min() > 0.99
    assert counts.sum() == 256

    vq = VectorQuantizer(3, 8, codebook_dim=3, dead_code_threshold=0.0)
    with torch.no_grad():
        vq.project_in.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        vq.project_in.bias.zero_()
    z = x.t().reshape(1, 3, 16, 16)
    vq.train()
    vq(z)
    assert bool(vq.initialized)
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(8), atol=1e-5)


def test_dead_code_restart_revives_a_killed_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 16, codebook_dim=4, dead_code_threshold=0.1)
    with torch.no_grad():  # identity projection: the inputs are what the codebook sees
        vq.project_in.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        vq.project_in.bias.zero_()
    # Encoder outputs in a cone around (1, 1, 1, 1): the opposite half-sphere gets nothing.
    z = torch.ones(8, 4, 8, 8) + 0.4 * torch.randn(8, 4, 8, 8)
    vq.train()
    for _ in range(5):
        vq(z)
    inputs = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    # Kill code 3: move it to the antipode of the data, with no use on record.
    with torch.no_grad():
        vq.codebook[3] = -F.normalize(inputs.mean(0), dim=0)
        vq.cluster_size[3] = 0.0
        vq.embed_sum[3] = 0.0
    vq.eval()
    assert 3 not in vq(z)[1]
    killed = vq.codebook[3].clone()

    vq.train()
    vq(z)  # the EMA step sees code 3 dead and re-seeds it from this batch's outputs
    assert not torch.equal(vq.codebook[3], killed)
    assert (inputs @ vq.codebook[3]).max() > 0.999  # it is one of the current outputs
    vq.eval()
    assert 3 in vq(z)[1]  # and now it is used

    # Without restarts the same killed code stays dead.
    off = VectorQuantizer(4, 16, codebook_dim=4, dead_code_threshold=0.0)
    off.load_state_dict(vq.state_dict())
    with torch.no_grad():
        off.codebook[3] = killed
        off.cluster_size[3] = 0.0
        off.embed_sum[3] = 0.0
    off.train()
    off(z)
    off.eval()
    assert 3 not in off(z)[1]


def test_fsq_round_trips_every_code():
    fsq = FSQ(16, levels=(8, 5, 5, 5))
    assert fsq.num_codes == 1000
    every = torch.arange(1000).reshape(1, 10, 100)
    points = fsq.indices_to_codes(every, project_out=False)  # (1, 4, 10, 100) in [-1, 1]
    assert points.min() >= -1 and points.max() <= 1
    assert torch.equal(fsq.codes_to_indices(points), every)
    assert torch.unique(points.reshape(4, -1).t(), dim=0).shape[0] == 1000  # all distinct

    z = torch.randn(4, 16, 8, 8) * 3
    quantized, indices, aux = fsq(z)
    assert indices.min() >= 0 and indices.max() < 1000 and float(aux["loss"]) == 0.0
    assert torch.allclose(fsq.indices_to_codes(indices), quantized, atol=1e-6)
    # bounding then rounding reaches every level of every dimension
    digits = fsq.indices_to_codes(torch.randint(0, 1000, (1, 64, 64)), project_out=False)
    levels = [torch.unique(digits[0, d]).numel() for d in range(4)]
    assert levels == [8, 5, 5, 5]
    # the bound maps to the right number of integers, and 0 to 0
    bounded = fsq.bound(torch.linspace(-20, 20, 2001).unsqueeze(1).repeat(1, 4))
    assert [torch.unique(bounded[:, d].round()).numel() for d in range(4)] == [8, 5, 5, 5]
    assert torch.allclose(fsq.bound(torch.zeros(1, 4)), torch.zeros(1, 4), atol=1e-6)


def test_fsq_model_trains_and_round_trips(tmp_path):
    make_shape_folder(tmp_path / "images", 40, seed=3)
    result = train(
        tmp_path / "images",
        tmp_path / "ckpt",
        preset="tiny-fsq",
        steps=20,
        batch_size=8,
        device="cpu",
        eval_every=20,
        threads=1,
    )
    assert result.metrics["num_codes"] == 64
    tok = Tokenizer.load(tmp_path / "ckpt", device="cpu")
    codes = tok.encode(sorted((tmp_path / "images").iterdir())[:4])
    assert codes.dtype == np.uint16 and codes.shape == (4, 8, 8) and codes.max() < 64
    assert np.array_equal(tok.decode(codes), tok.decode(codes))


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def test_psnr_and_ssim_basics():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    y = (x + 0.1).clamp(0, 1)
    expected = 10 * torch.log10(1 / (x - y).pow(2).flatten(1).mean(1))
    assert torch.allclose(psnr(x, y), expected)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    s = ssim(x, torch.rand(3, 3, 32, 32))
    assert (s < 0.2).all()
    assert (ssim(x, y) > s).all()
    with pytest.raises(ValueError):
        ssim(x[:, :, :8, :8], y[:, :, :8, :8])


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.random((40, 48, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ref = metrics.structural_similarity(
        a,
        b,
        data_range=1.0,
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    to_t = lambda v: torch.from_numpy(v).permute(2, 0, 1)[None]  # noqa: E731
    assert abs(float(ssim(to_t(a), to_t(b))) - ref) < 1e-6


def test_codebook_statistics():
    uniform = np.arange(64) % 16
    assert codebook_usage(uniform, 32) == 0.5
    assert math.isclose(perplexity(uniform, 32), 16)
    assert math.isclose(entropy_bits(uniform, 32), 4)
    assert perplexity(np.zeros(10, dtype=int), 32) == 1
    b = bytes_per_image(16, 1024, entropy=8.0)
    assert b == {
        "bytes_per_image": 320,
        "bytes_per_image_uint16": 512,
        "bytes_per_image_entropy": 256.0,
    }


def test_holdout_split_is_stable():
    names = [f"class{c}/image_{i:04d}.jpg" for c in range(20) for i in range(30)]
    train_a, held_a = split_holdout(names, 0.1)
    train_b, held_b = split_holdout(list(reversed(names)) + ["new/extra.jpg"], 0.1)
    assert set(held_a) <= set(held_b) and not set(held_a) & set(train_b)
    assert 30 <= len(held_a) <= 90  # ~60: by path, not by the file name every class shares
    assert len({n.split("/")[1] for n in held_a}) > 1


# ------------------------------------------------------------------------------------------
# A trained tiny tokenizer
# ------------------------------------------------------------------------------------------


def test_tiny_preset_learns_shapes(trained):
    ckpt, result, unseen = trained
    assert result.step == TRAIN_STEPS and result.held_out_images > 0
    model = load_checkpoint(ckpt)
    pixels, _ = decode_images(sorted(unseen.iterdir()), model.config.image_size)
    m = evaluate(model, pixels)
    assert m["psnr"] > PSNR_THRESHOLD, m
    assert m["codebook_usage"] >= USAGE_THRESHOLD, m
    untrained = evaluate(create_model("tiny"), pixels)
    assert untrained["psnr"] < m["psnr"] - 5


def test_checkpoint_files_and_id(trained):
    ckpt, result, _ = trained
    assert (ckpt / WEIGHTS_FILE).is_file() and (ckpt / CONFIG_FILE).is_file()
    info = read_checkpoint_info(ckpt)
    assert info["step"] == TRAIN_STEPS and info["config"]["name"] == "tiny"
    assert info["metrics"]["psnr"] == result.metrics["psnr"]
    ident = tokenizer_id(ckpt)
    assert len(ident) == 64 and ident == tokenizer_id(ckpt / WEIGHTS_FILE)
    assert Tokenizer.load(ckpt / CONFIG_FILE, device="cpu").id == ident


def test_encode_decode_is_deterministic(trained):
    ckpt, _, unseen = trained
    files = sorted(unseen.iterdir())[:10]
    tok = Tokenizer.load(ckpt, device="cpu")
    codes = tok.encode(files)
    assert codes.dtype == np.uint16 and codes.shape == (10, 8, 8)
    assert np.array_equal(codes, Tokenizer.load(ckpt, device="cpu").encode(files))
    images = tok.decode(codes)
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 3)
    assert np.array_equal(images, tok.decode(codes))
    assert np.array_equal(tok.decode(codes[3]), images[3:4])  # one grid works too
    # decoding is close to the input: the codes carry the picture
    pixels = tok.preprocess(files)
    decoded = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert float(psnr(pixels / 255, decoded / 255).mean()) > PSNR_THRESHOLD - 2
    with pytest.raises(ValueError, match="codes must be"):
        tok.decode(np.zeros((2, 4, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(np.full((8, 8), 64, dtype=np.uint16))


def test_training_resumes_from_its_checkpoint(tmp_path):
    make_shape_folder(tmp_path / "images", 40, seed=5)
    args = dict(preset="tiny", batch_size=8, device="cpu", eval_every=1000, threads=1)
    first = train(tmp_path / "images", tmp_path / "ckpt", steps=10, **args)
    assert (first.step, first.resumed_from) == (10, 0)
    more = train(tmp_path / "images", tmp_path / "ckpt", steps=25, **args)
    assert (more.step, more.resumed_from, more.images_seen) == (25, 10, 200)
    done = train(tmp_path / "images", tmp_path / "ckpt", steps=25, **args)
    assert (done.step, done.resumed_from) == (25, 25) and done.metrics
    with pytest.raises(ValueError, match="another config"):
        train(tmp_path / "images", tmp_path / "ckpt", steps=30, codebook_size=32, **args)
    fresh = train(tmp_path / "images", tmp_path / "ckpt", steps=5, resume=False, **args)
    assert (fresh.step, fresh.resumed_from) == (5, 0)


def test_train_checks_its_arguments(tmp_path):
    make_shape_folder(tmp_path / "images", 4, seed=5)
    with pytest.raises(ValueError, match="budget"):
        train(tmp_path / "images", tmp_path / "ckpt", preset="tiny")
    with pytest.raises(ValueError, match="not a folder"):
        train(tmp_path / "missing", tmp_path / "ckpt", preset="tiny", steps=1)
    with pytest.raises(ValueError, match="precision"):
        train(tmp_path / "images", tmp_path / "ckpt", preset="tiny", steps=1, precision="fp8")
