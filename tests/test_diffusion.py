"""The DiT fallback: model invariants, checkpoints, training, generation and the search fallback.

Generation tests use the committed fixture tests/fixtures/tiny_dit (a tiny tokenizer and a
tiny DiT trained on drawn shapes by tests/fixtures/train_tiny_dit.py; its README says what it
measured) on a store of 120 unseen drawings indexed with the tiny CLIP fixture. Training
tests run a few steps only.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TESTS, run_cli, run_json
from fixtures.shapes import make_shape_folder
from fixtures.train_tiny_dit import dominant_colour
from PIL import Image
from vqret import Collection
from vqret.diffusion.checkpoint import CheckpointInfo, load_checkpoint, read_info, save_checkpoint
from vqret.diffusion.config import DiffusionConfig, get_config
from vqret.diffusion.fallback import decide
from vqret.diffusion.flow import sample
from vqret.diffusion.model import DiTBlock, create_model, sincos_2d_positions
from vqret.tokenizer.api import Tokenizer

FIXTURE = TESTS / "fixtures" / "tiny_dit"
# Tiny models in a subprocess: one thread each, so shared CI cores don't make them crawl.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tiny_clip):
    """A store of 120 unseen drawings (tiny CLIP), with the fixture tokenizer and DiT in it."""
    from vqret.retrieval.embedder import Embedder

    root = tmp_path_factory.mktemp("diffusion")
    make_shape_folder(root / "images", 120, seed=1234)
    embedder = Embedder(*tiny_clip, device="cpu", batch_size=64, num_workers=0)
    col = Collection.create(root / "images", root / "store", embedder=embedder)
    col.index()
    shutil.copytree(FIXTURE / "tokenizer", root / "store" / "tokenizer")
    shutil.copytree(FIXTURE / "diffusion", root / "store" / "diffusion")
    return root / "store"


@pytest.fixture(scope="module")
def generator(store_path, tiny_clip):
    from vqret.diffusion.generate import Generator

    return Generator.load(store_path, device="cpu")


def tiny_model(**overrides):
    return create_model("tiny", latent_channels=4, latent_size=8, cond_dim=16, **overrides)


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------


def test_adaln_zero_block_is_the_identity_at_init():
    torch.manual_seed(0)
    block = DiTBlock(64, heads=4, mlp_ratio=4.0, dropout=0.0)
    x, c = torch.randn(3, 10, 64), torch.randn(3, 64)
    assert torch.equal(block(x, c), x)
    # ... and stops being one once its modulation has weights: the gate is what held it
    torch.nn.init.normal_(block.adaln_modulation[-1].weight, std=0.1)
    assert not torch.allclose(block(x, c), x)


def test_dit_shapes_and_zero_output_at_init():
    torch.manual_seed(0)
    model = tiny_model()
    x, t = torch.randn(5, 4, 8, 8), torch.rand(5)
    emb = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    v = model(x, t, emb)
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0  # zero-initialised final layer (the paper's init)
    # unpatchify inverts the patch layout: tokens of a known image come back as the image
    p, g = model.config.patch_size, model.config.grid_tokens
    tokens = x.reshape(5, 4, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(5, g * g, p * p * 4)
    assert torch.equal(model.unpatchify(tokens), x)


def test_positions_are_fixed_and_distinct():
    pos = sincos_2d_positions(32, 4)
    assert pos.shape == (16, 32)
    assert torch.equal(pos, sincos_2d_positions(32, 4))
    assert torch.cdist(pos, pos).add(torch.eye(16) * 1e3).min() > 0.1  # every position unique


def test_null_embedding_and_guidance_one_is_the_conditional_model():
    torch.manual_seed(0)
    model = tiny_model().eval()
    for p in model.parameters():  # leave the zero init: make every branch matter
        torch.nn.init.normal_(p, std=0.05)
    emb = torch.nn.functional.normalize(torch.randn(2, 16), dim=1)
    noise = torch.randn(2, 4, 8, 8)
    plain = sample(model, emb, steps=3, guidance=1.0, noise=noise)
    guided = sample(model, emb, steps=3, guidance=3.0, noise=noise)
    uncond = sample(model, emb, steps=3, guidance=0.0, noise=noise)
    uncond_other = sample(model, -emb, steps=3, guidance=0.0, noise=noise)
    assert not torch.allclose(plain, guided)
    assert torch.allclose(uncond, uncond_other, atol=1e-6)  # guidance 0 ignores the embedding
    assert not torch.allclose(plain, uncond)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch_size": 3}, "multiple of patch_size"),
        ({"num_heads": 5}, "num_heads"),
        ({"cond_drop_prob": 1.0}, "cond_drop_prob"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"depth": 0}, "depth must be a positive integer"),
        ({"no_such_field": 1}, "unknown diffusion config keys"),
    ],
)
def test_bad_configs_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **overrides)
    with pytest.raises(ValueError, match="unknown diffusion preset"):
        get_config("huge")


def test_presets_match_the_paper_sizes():
    sizes = {}
    for name in ("gpu-s", "gpu-b"):
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = create_model(name, latent_channels=4, latent_size=32, cond_dim=768)
        sizes[name] = sum(p.numel() for p in model.parameters()) / 1e6
    # DiT-S/2 33M and DiT-B/2 130M (class embedding table vs our CLIP MLP: within a few %)
    assert 31 < sizes["gpu-s"] < 35
    assert 125 < sizes["gpu-b"] < 135


# ------------------------------------------------------------------------------------------
# Tokenizer latents and checkpoints
# ------------------------------------------------------------------------------------------


def test_tokenizer_latents_decode_to_the_same_codes_and_pixels(tmp_path):
    tok = Tokenizer.load(FIXTURE / "tokenizer", device="cpu")
    make_shape_folder(tmp_path, 6, seed=99)
    paths = sorted(tmp_path.glob("*.png"))
    latents = tok.latents(paths)
    assert latents.dtype == np.float32
    assert latents.shape == (6, tok.config.z_channels, tok.grid_size, tok.grid_size)
    images, codes = tok.decode_latents(latents)
    assert np.array_equal(codes, tok.encode(paths))  # quantizing the latents = encoding
    assert np.array_equal(images, tok.decode(codes))
    with pytest.raises(ValueError, match="latents must be"):
        tok.decode_latents(latents[:, :3])


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    info = CheckpointInfo(config=model.config, latent_scale=1.7, tokenizer_id="ab" * 32,
                          clip={"model": "m", "weights_id": "w", "embed_dim": 16}, step=12)
    save_checkpoint(model, info, tmp_path / "ckpt")
    loaded, back = load_checkpoint(tmp_path / "ckpt")
    assert back.config == model.config and back.latent_scale == 1.7 and back.step == 12
    assert back.tokenizer_id == "ab" * 32 and back.clip["weights_id"] == "w"
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    emb = torch.nn.functional.normalize(torch.randn(2, 16), dim=1)
    model.eval()
    assert torch.equal(loaded(x, t, emb), model(x, t, emb))
    # the weights file alone is enough: its metadata repeats the facts
    (tmp_path / "ckpt" / "diffusion.json").unlink()
    assert read_info(tmp_path / "ckpt" / "diffusion.safetensors").latent_scale == 1.7
    with pytest.raises(ValueError, match="no diffusion model here"):
        load_checkpoint(tmp_path / "nothing")


def test_fixture_records_its_tokenizer_and_clip(tiny_clip):
    info = read_info(FIXTURE / "diffusion")
    assert info.tokenizer_id == Tokenizer.load(FIXTURE / "tokenizer").id
    assert info.clip["model"] == "tiny-clip" and info.config.cond_dim == 64
    assert isinstance(info.config, DiffusionConfig) and info.latent_scale > 0


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------


def test_generate_cli_draws_the_prompted_colour(store_path, tmp_path):
    rows = run_json("generate", "a red circle", "-o", str(tmp_path / "out.png"), "--n", "8",
                    "--steps", "25", "--store", str(store_path), env=ONE_THREAD)
    assert [r["path"] for r in rows] == [str(tmp_path / "out.png")] + [
        str(tmp_path / f"out-{i}.png") for i in range(1, 8)]
    colours = [dominant_colour(np.asarray(Image.open(r["path"]).convert("RGB"))) for r in rows]
    assert colours.count("red") >= 6, colours
    assert all(r["codes_shape"] == [8, 8] and -1 <= r["clip_score"] <= 1 for r in rows)
    assert all(len(r["codes"]) == 64 and max(r["codes"]) < 64 for r in rows)


def test_colour_follows_the_prompt(generator):
    hits = 0
    for colour in ("blue", "green", "yellow"):
        images = generator.generate(f"a {colour} square", n=4, steps=25, seed=10)
        hits += sum(dominant_colour(im) == colour for im in images.images)
    assert hits >= 9, hits  # of 12


def test_higher_guidance_raises_the_clip_score(generator):
    prompts = ["a red circle", "a blue star", "a green triangle", "a purple square"]

    def mean_score(guidance: float) -> float:
        return float(np.mean([generator.generate(p, n=4, steps=20, guidance=guidance,
                                                 seed=3).scores for p in prompts]))

    low, high = mean_score(1.0), mean_score(4.0)
    assert high > low + 0.02, (low, high)


def test_a_seeded_run_is_reproducible(generator):
    a = generator.generate("a yellow star", n=2, steps=10, seed=5)
    b = generator.generate("a yellow star", n=2, steps=10, seed=5)
    c = generator.generate("a yellow star", n=1, steps=10, seed=6)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.codes, b.codes)
    # the picture is exactly what its codes decode to: it can be stored like any other
    assert np.array_equal(generator.tokenizer.decode(a.codes), a.images)
    assert np.array_equal(a.images[1], c.images[0])  # image i uses seed + i, whatever n
    assert not np.array_equal(a.images[0], c.images[0])


def test_generate_from_an_embedding_and_bad_options(generator):
    emb = generator.collection.query_embedding(text="a green circle")
    out = generator.generate(embedding=emb, n=1, steps=5)
    assert out.images.shape == (1, 32, 32, 3) and out.prompt is None
    with pytest.raises(ValueError, match="exactly one"):
        generator.generate("a", embedding=emb)
    with pytest.raises(ValueError, match="dimension"):
        generator.generate(embedding=np.ones(7, np.float32))
    with pytest.raises(ValueError, match="prior_blend"):
        generator.generate("a red circle", prior_blend=2.0)
    with pytest.raises(ValueError, match="solver"):
        generator.generate("a red circle", solver="rk4")
    from vqret.diffusion.generate import output_paths

    with pytest.raises(ValueError, match="must be a .png file"):
        output_paths("out.jpg", 2)


def test_a_model_refuses_another_tokenizer_or_clip(store_path, tmp_path):
    from vqret.diffusion.generate import Generator
    from vqret.tokenizer.checkpoint import load_checkpoint as load_tokenizer
    from vqret.tokenizer.checkpoint import save_checkpoint as save_tokenizer

    other = load_tokenizer(FIXTURE / "tokenizer")
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    save_tokenizer(other, tmp_path / "other-tokenizer")
    with pytest.raises(ValueError, match="is not the .* the diffusion model was trained with"):
        Generator.load(store_path, tokenizer=tmp_path / "other-tokenizer", device="cpu")
    info = read_info(FIXTURE / "diffusion")
    info.clip["weights_id"] = "sha256:another-model"
    model, _ = load_checkpoint(FIXTURE / "diffusion")
    save_checkpoint(model, info, tmp_path / "other-dit")
    with pytest.raises(ValueError, match="was trained on embeddings of"):
        Generator.load(store_path, model=tmp_path / "other-dit", device="cpu")


def test_info_names_the_diffusion_model(store_path):
    info = Collection.open(store_path).info()
    assert info["diffusion"].startswith(str(store_path / "diffusion"))


def test_python_api_generate(store_path, tmp_path):
    import vqret

    images = vqret.generate("a red square", store=store_path, n=2, steps=5, device="cpu")
    paths = images.save(tmp_path / "api.png")
    assert [p.name for p in paths] == ["api.png", "api-1.png"]
    assert Image.open(paths[1]).size == (32, 32)


# ------------------------------------------------------------------------------------------
# The search fallback
# ------------------------------------------------------------------------------------------


# Nothing the shapes collection holds. The tiny CLIP knows only its 24 captions and maps
# other texts close together, some near its images: this one scores 0.81 on the test store
# (calibrated threshold 0.87 from the probes, 0.94 from captions; a match scores ~0.97).
FAR_QUERY = "purple elephant on mars"


def test_fallback_triggers_far_from_the_collection_and_not_for_a_match(store_path, tmp_path):
    far = run_cli("search", FAR_QUERY, "--store", str(store_path), "--json",
                  "--generate-out", str(tmp_path / "far.png"), env=ONE_THREAD)
    rows = json.loads(far.stdout)
    generated = rows[-1]["generated"]
    assert generated["best_score"] < generated["threshold"]
    assert rows[-1]["path"] == str(tmp_path / "far.png") and (tmp_path / "far.png").is_file()
    assert "below threshold" in far.stderr
    assert all("generated" not in r for r in rows[:-1]) and len(rows) == 11

    match = run_cli("search", "a red circle", "--store", str(store_path), "--json",
                    env=ONE_THREAD)
    rows = json.loads(match.stdout)
    assert len(rows) == 10 and all("generated" not in r for r in rows)
    assert "no image generated" in match.stderr
    calibration = json.loads((store_path / "diffusion" / "threshold.json").read_text())
    assert calibration["method"] == "probes"
    assert rows[0]["score"] >= calibration["threshold"]


def test_fallback_modes_and_threshold_override(store_path, tmp_path):
    never = run_json("search", FAR_QUERY, "--store", str(store_path), "--generate", "never",
                     env=ONE_THREAD)
    assert all("generated" not in r for r in never)
    forced = run_cli("search", "a red circle", "--store", str(store_path), "--threshold", "2",
                     "--generate-out", str(tmp_path / "forced.png"), env=ONE_THREAD)
    table = "".join(forced.stdout.split())  # rich folds long paths in a narrow table
    assert "forced.png" in table and "gen" in table
    bad = run_cli("search", "a red circle", "--store", str(store_path), "--generate", "maybe",
                  check=False)
    assert bad.returncode == 2 and "generate must be auto, never or always" in bad.stderr
    assert decide("auto", None, 0.5) and not decide("auto", 0.6, 0.5) and decide("always", 1, 0)


def test_no_model_means_no_fallback_and_captions_calibrate(tmp_path, embedder):
    from vqret import QueryError
    from vqret.diffusion.fallback import PROBES, calibrate

    rows = make_shape_folder(tmp_path / "images", 48, seed=3)
    col = Collection.create(tmp_path / "images", embedder=embedder)
    col.index()
    results = col.search(text=FAR_QUERY, k=3, generate="auto")
    assert results.generated is None and results.note is None and len(results) == 3
    assert col.info()["diffusion"].startswith("none")
    with pytest.raises(QueryError, match="needs a diffusion model"):
        col.search(text=FAR_QUERY, k=3, generate="always")
    from vqret.diffusion.generate import Generator

    with pytest.raises(ValueError, match="no diffusion model here"):
        Generator.load(col)

    probes = calibrate(col)
    assert (probes.method, probes.samples) == ("probes", len(PROBES))
    csv = tmp_path / "captions.csv"
    csv.write_text("image,text\n" + "".join(f"{p.name},{c}\n" for p, c, _, _ in rows))
    col.index_texts(csv)
    captions = calibrate(col)
    assert (captions.method, captions.samples) == ("captions", 48)
    # nearly every caption of the collection passes; the far query does not
    best = [col.search(text=c, k=1)[0].score for _, c, _, _ in rows]
    assert np.mean(np.array(best) >= captions.threshold) >= 0.9
    assert col.search(text=FAR_QUERY, k=1)[0].score < captions.threshold


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def test_training_resumes_where_it_stopped(store_path, tmp_path):
    from safetensors.torch import load_file
    from vqret.diffusion.train import train

    args = dict(preset="tiny", batch_size=8, device="cpu", save_every_s=1e9)
    straight = train(store_path, tmp_path / "straight", steps=4, **args)
    first = train(store_path, tmp_path / "split", steps=2, **args)
    resumed = train(store_path, tmp_path / "split", steps=4, **args)
    assert (straight.step, first.step, resumed.step, resumed.resumed_from) == (4, 2, 4, 2)
    # every step's randomness comes from (seed, step): 2 + 2 steps = 4 steps
    a = load_file(str(tmp_path / "straight" / "diffusion.safetensors"))
    b = load_file(str(tmp_path / "split" / "diffusion.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    done = train(store_path, tmp_path / "split", steps=4, **args)  # budget spent: no steps
    assert done.step == 4 and done.loss is None
    with pytest.raises(ValueError, match="can't resume"):
        train(store_path, tmp_path / "split", steps=6, **{**args, "preset": "cpu"})


def test_train_cli_and_the_latents_cache(store_path, tmp_path):
    out = tmp_path / "dit"
    first = run_json("diffusion", "train", "--store", str(store_path), "--preset", "tiny",
                     "--steps", "2", "-b", "4", "--out", str(out), "--device", "cpu",
                     env=ONE_THREAD)
    assert first["step"] == 2 and first["images"] == 120 and (out / "train-state.pt").is_file()
    again = run_json("diffusion", "train", "--store", str(store_path), "--steps", "3", "-b",
                     "4", "--out", str(out), "--device", "cpu", env=ONE_THREAD)
    assert (again["step"], again["resumed_from"]) == (3, 2)  # preset from the checkpoint
    tok_id = Tokenizer.load(store_path / "tokenizer").id
    with np.load(store_path / "latents" / f"{tok_id}.npz") as cache:
        assert len(cache["ids"]) == 120 and cache["latents"].shape == (120, 8, 8, 8)
    none = run_cli("diffusion", "train", "--store", str(store_path), check=False)
    assert none.returncode == 1 and "give a budget" in none.stderr


def test_bench_diffusion(store_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n\na red circle\n")
    report = run_json("bench", "diffusion", "--store", str(store_path), "--prompts",
                      str(prompts), "--n", "1", "--guidance", "0,3", "--steps", "3",
                      "--plot", str(tmp_path / "g.png"), "--device", "cpu", env=ONE_THREAD)
    assert report["prompts"] == 2 and report["chance"] == 0.5
    # rates are timings: positive and finite here; which is faster is the benchmark's to say
    for key in ("samples_per_s_25_steps", "samples_per_s_50_steps"):
        assert np.isfinite(report[key]) and report[key] > 0, key
    assert [r["guidance"] for r in report["guidance_sweep"]] == [0.0, 3.0]
    assert Image.open(tmp_path / "g.png").size[0] > 100
