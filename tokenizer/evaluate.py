"""Reconstruction quality and codebook use of a model on a set of images."""

from __future__ import annotations

from typing import Any

import torch

from .data import from_unit, to_unit
from .metrics import bytes_per_image, codebook_usage, entropy_bits, psnr, ssim
from .model import VQVAE

__all__ = ["evaluate"]


@torch.inference_mode()
def evaluate(model: VQVAE, images: torch.Tensor, *, batch_size: int = 64) -> dict[str, Any]:
    """PSNR, SSIM, codebook usage, perplexity and bytes per image of `model` on `images`.

    `images` is uint8 (N, 3, S, S) at the model's image_size. Reconstructions are rounded to
    uint8 before they are compared, as a user would save them. Usage is the fraction of the
    code vocabulary that occurs at least once over all N grids, so it depends on N: with
    N * grid**2 tokens spread over K codes, a small N can't reach 100%.
    """
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 (N, 3, S, S), got {images.dtype} {tuple(images.shape)}"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    psnrs, ssims, codes = [], [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            recon, indices, _ = model(to_unit(batch))
            x = batch.float() / 255
            y = from_unit(recon).float() / 255
            psnrs.append(psnr(x, y).cpu())
            ssims.append(ssim(x, y).cpu())
            codes.append(indices.cpu())
    finally:
        model.train(was_training)
    if not codes:
        raise ValueError("no images to evaluate on")
    all_codes = torch.cat(codes)
    num_codes = model.num_codes
    entropy = entropy_bits(all_codes, num_codes)
    return {
        "images": int(images.shape[0]),
        "psnr": round(float(torch.cat(psnrs).clamp(max=100).mean()), 3),
        "ssim": round(float(torch.cat(ssims).mean()), 4),
        "codebook_usage": round(codebook_usage(all_codes, num_codes), 4),
        "perplexity": round(2.0**entropy, 1),
        "num_codes": num_codes,
        "grid_size": int(all_codes.shape[-1]),
        **bytes_per_image(int(all_codes.shape[-1]), num_codes, entropy),
    }
