"""Tokenizer quality on a held-out folder: PSNR, SSIM, codebook usage, perplexity, bytes/image.

Every image is shown to the tokenizer as it would be at encode time (short side resized to
the model's image_size, centre square), encoded to a code grid, decoded, rounded to uint8
and compared with its input. Usage is the share of the codebook that occurs at least once
over the whole folder, so it depends on the folder's size: 24 images x 256 codes = 6,144
tokens can at best touch ~99.7% of 1,024 codes even if every code were equally likely.
Encode and decode throughput are measured on the same pass.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from vqret.retrieval.walk import walk_images
from vqret.tokenizer.api import Tokenizer
from vqret.tokenizer.evaluate import evaluate

Log = Callable[[str], Any]


def run_tokenizer_benchmark(
    checkpoint: str | os.PathLike[str],
    images: str | os.PathLike[str],
    *,
    limit: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    threads: int | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Measure `checkpoint` on up to `limit` images under the folder `images`.

    Returns a flat JSON-able dict: psnr (dB), ssim, codebook_usage (0..1), perplexity,
    bytes_per_image (bit-packed), bytes_per_image_uint16 (as stored), bytes_per_image_entropy
    (order-0 entropy coder), and encode/decode images per second.
    """
    root = Path(images)
    if not root.is_dir():
        raise ValueError(f"not a folder: {root}")
    if limit is not None and limit < 1:
        raise ValueError("limit must be >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    paths = [str(root / e.relpath) for e in itertools.islice(walk_images(root), limit)]
    if not paths:
        raise ValueError(f"no image files under {root}")

    tok = Tokenizer.load(checkpoint, device=device, batch_size=batch_size)
    started = time.perf_counter()
    pixels = tok.preprocess(paths)
    load_s = time.perf_counter() - started
    if log:
        log(
            f"{len(paths)} images under {root} at {tok.image_size}x{tok.image_size} "
            f"({load_s:.1f} s to load)"
        )

    started = time.perf_counter()
    codes = tok.encode(pixels)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    tok.decode(codes)
    decode_s = time.perf_counter() - started

    metrics = evaluate(tok.model, pixels, batch_size=batch_size)
    info = tok.info
    return {
        "tokenizer_id": tok.id,
        "checkpoint": str(tok.path),
        "preset": tok.config.name,
        "train_step": info.get("step"),
        "device": str(tok.device),
        "torch_threads": torch.get_num_threads(),
        "image_size": tok.image_size,
        **metrics,
        "encode_images_per_s": round(len(paths) / max(encode_s, 1e-9), 1),
        "decode_images_per_s": round(len(paths) / max(decode_s, 1e-9), 1),
    }
