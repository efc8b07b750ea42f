"""The DiT fallback's numbers: samples/s, and prompt match and CLIP score vs guidance.

- samples/s: `n` images for one prompt, end to end (prior, sampling with guidance 3, decoding
  through the tokenizer, CLIP scoring), at 25 and at 50 Euler steps.
- prompt-match accuracy: each generated image is classified zero-shot by the store's CLIP
  among all the benchmark's prompts; correct when its own prompt wins. Chance is 1/prompts.
- CLIP score: mean cosine between each image and its prompt's text embedding.
Both are swept over guidance scales (0 = unconditional, 1 = conditional without guidance).
Prompts: a text file, one a line, or the store's own captions (its text rows).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vqret import Collection
from vqret.diffusion.generate import Generator
from vqret.retrieval.store import TEXTS

Log = Callable[[str], Any]


def run_diffusion_benchmark(
    store: str | os.PathLike[str] | None = None,
    *,
    model: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    prompts_file: str | os.PathLike[str] | None = None,
    n: int = 4,
    guidance: list[float] | None = None,
    steps: int = 25,
    limit: int = 24,
    plot: str | os.PathLike[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Measure `store`'s diffusion model; returns a JSON-able dict (see module docstring)."""
    say = log or (lambda line: None)
    scales = guidance if guidance is not None else [0.0, 1.0, 2.0, 3.0, 5.0]
    if not scales or any(g < 0 for g in scales):
        raise ValueError("guidance scales must be >= 0, at least one")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'vqret[bench]'") from None
    if threads is not None:
        torch.set_num_threads(threads)
    collection = Collection.open(store, device=device)
    prompts = _prompts(collection, prompts_file, limit)
    if len(prompts) < 2:
        raise ValueError("the benchmark needs at least 2 distinct prompts (--prompts FILE, "
                         "or captions in the store via `vqret index-texts`)")
    gen = Generator.load(collection, model=model, tokenizer=tokenizer, device=device)
    report: dict[str, Any] = {
        "model_step": gen.info.step, "parameters": sum(p.numel() for p in gen.model.parameters()),
        "prompts": len(prompts), "images_per_prompt": n, "device": str(gen.device),
        "threads": torch.get_num_threads(),
    }
    gen.generate(prompts[0], n=1, steps=2)  # warm-up: first calls pay for allocation
    for s in (25, 50):
        started = time.perf_counter()
        gen.generate(prompts[0], n=n, steps=s, guidance=3.0)
        report[f"samples_per_s_{s}_steps"] = round(n / (time.perf_counter() - started), 3)
        say(f"{s} steps: {report[f'samples_per_s_{s}_steps']} samples/s")

    text_emb = collection.embedder.embed_texts(prompts)  # (P, E)
    sweep = []
    for g in scales:
        correct, scores = 0, []
        for i, prompt in enumerate(prompts):
            images = gen.generate(prompt, n=n, steps=steps, guidance=g, seed=1000 * i)
            image_emb = collection.embedder.embed_images(images.to_pil())  # (n, E)
            correct += int((np.argmax(image_emb @ text_emb.T, axis=1) == i).sum())
            scores.extend(images.scores.tolist())
        row = {"guidance": g, "prompt_match": round(correct / (n * len(prompts)), 4),
               "clip_score": round(float(np.mean(scores)), 4)}
        sweep.append(row)
        say(f"guidance {g}: prompt match {row['prompt_match']:.3f}, CLIP score "
            f"{row['clip_score']:.4f}")
    report["steps_in_sweep"] = steps
    report["chance"] = round(1 / len(prompts), 4)
    report["guidance_sweep"] = sweep
    if plot is not None:
        write_plot(sweep, Path(plot), report["chance"])
        report["plot"] = str(plot)
    return report


def _prompts(collection: Collection, prompts_file, limit: int) -> list[str]:
    if prompts_file is not None:
        path = Path(prompts_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"{path}: cannot read prompts ({e.strerror or e})") from e
    else:
        lines = collection.store.read_table(["text"], TEXTS).column("text").to_pylist()
    seen: dict[str, None] = {}
    for line in lines:
        if line.strip():
            seen.setdefault(line.strip(), None)
    return list(seen)[:limit]


def write_plot(sweep: list[dict[str, Any]], path: Path, chance: float) -> None:
    """Prompt-match accuracy and CLIP score against guidance, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    g = [row["guidance"] for row in sweep]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(g, [row["prompt_match"] for row in sweep], "o-")
    left.axhline(chance, color="grey", linestyle=":", label="chance")
    left.set(xlabel="guidance", ylabel="prompt-match accuracy", ylim=(0, 1.02))
    left.legend()
    right.plot(g, [row["clip_score"] for row in sweep], "o-", color="tab:orange")
    right.set(xlabel="guidance", ylabel="CLIP score to the prompt")
    fig.suptitle("DiT fallback: guidance sweep")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
