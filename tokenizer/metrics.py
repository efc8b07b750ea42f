"""Reconstruction and codebook metrics. Images are float (N, 3, H, W) in [0, 1].

SSIM follows Wang, Bovik, Sheikh, Simoncelli 2004 ("Image Quality Assessment: From Error
Visibility to Structural Similarity"): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, local statistics over the window's valid positions only, computed per colour
channel and averaged: the same numbers as scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1, channel_axis=...)` (tests/test_tokenizer.py checks it where scikit-image is
installed). Neither torchmetrics nor scikit-image is a dependency, so it is written here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bytes_per_image",
    "code_histogram",
    "codebook_usage",
    "entropy_bits",
    "perplexity",
    "psnr",
    "ssim",
]


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, (N,) in dB. Identical images give +inf."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def _gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity per image, (N,). Images must be at least window_size wide."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape: {x.shape}, {y.shape}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim needs images of at least {window_size}x{window_size} pixels")
    channels = x.shape[1]
    g = _gaussian_window(window_size, sigma).to(x.device)
    # A separable Gaussian: filter rows then columns, one group per channel, no padding.
    row = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    col = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, row, groups=channels), col, groups=channels)

    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(1).float()


# ------------------------------------------------------------------------------------------
# Codebook statistics: indices are integer arrays of any shape
# ------------------------------------------------------------------------------------------


def code_histogram(indices: Tensor | np.ndarray, num_codes: int) -> np.ndarray:
    """Counts per code, (num_codes,) int64."""
    flat = np.asarray(indices).reshape(-1).astype(np.int64)
    return np.bincount(flat, minlength=num_codes)[:num_codes]


def codebook_usage(indices: Tensor | np.ndarray, num_codes: int) -> float:
    """Fraction of the codebook that occurs at least once in `indices` (0..1)."""
    return float((code_histogram(indices, num_codes) > 0).mean())


def entropy_bits(indices: Tensor | np.ndarray, num_codes: int) -> float:
    """Empirical entropy of the code distribution, in bits per code."""
    counts = code_histogram(indices, num_codes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def perplexity(indices: Tensor | np.ndarray, num_codes: int) -> float:
    """2 ** entropy: the number of equally used codes that would give the same entropy."""
    return float(2.0 ** entropy_bits(indices, num_codes))


def bytes_per_image(grid_size: int, num_codes: int, entropy: float | None = None) -> dict:
    """Storage cost of one code grid three ways: bit-packed at ceil(log2 K) bits per code,
    as the uint16 grid the store keeps, and at `entropy` bits per code (an ideal
    order-0 entropy coder), when given."""
    n = grid_size * grid_size
    out = {
        "bytes_per_image": math.ceil(n * math.ceil(math.log2(num_codes)) / 8),
        "bytes_per_image_uint16": 2 * n,
    }
    if entropy is not None:
        out["bytes_per_image_entropy"] = round(n * entropy / 8, 1)
    return out
