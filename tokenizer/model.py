"""The VQ-VAE: a convolutional encoder, a quantizer, and a convolutional decoder.

References:
    van den Oord, Vinyals, Kavukcuoglu 2017, "Neural Discrete Representation Learning".
    Esser, Rombach, Ommer 2021, "Taming Transformers for High-Resolution Image Synthesis"
        (the resnet-block encoder/decoder body: GroupNorm, SiLU, 2x steps per level).
    Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple".

Images enter as (N, 3, H, W) floats in [-1, 1]; codes leave as (N, h, w) integer grids with
h = H / 2 ** (len(channel_mult) - 1). No attention layers and no GAN or perceptual loss: the
model is trained on pixel MSE alone, which is what PSNR measures, and stays cheap enough to
train on a laptop CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .config import TokenizerConfig, get_config, list_presets
from .quantizers import FSQ, VectorQuantizer

__all__ = ["VQVAE", "create_model", "list_presets"]


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Pre-activation resnet block: (GroupNorm, SiLU, conv3x3) twice, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        # Zero-init the residual branch's last conv: every block starts as the identity, so
        # a deep stack trains from the first step without a warm-up of exploding activations.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (N, C, H, W) -> (N, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # Nearest + conv rather than a transposed conv: no checkerboard artefacts.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ------------------------------------------------------------------------------------------
# Encoder and decoder
# ------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, c: TokenizerConfig) -> None:
        super().__init__()
        widths = [c.channels * m for m in c.channel_mult]
        self.patch_size = c.patch_size
        self.conv_in = nn.Conv2d(3 * c.patch_size**2, c.channels, 3, padding=1)
        blocks: list[nn.Module] = []
        width = c.channels
        for level, level_width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(width, level_width, c.norm_groups))
                width = level_width
            if level != len(widths) - 1:
                blocks.append(Downsample(width))
        blocks.append(ResBlock(width, width, c.norm_groups))  # the middle block, at grid size
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(c.norm_groups, width)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.patch_size > 1:
            # Space-to-depth: the first convs see (3 p^2, H/p, W/p), wider and smaller maps
            # that CPUs run at several times the FLOP/s of thin full-resolution ones.
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.blocks(self.conv_in(x))  # (N, 3 p^2, H/p, W/p) -> (N, C_last, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, z_channels, h, w)


class Decoder(nn.Module):
    def __init__(self, c: TokenizerConfig) -> None:
        super().__init__()
        widths = [c.channels * m for m in c.channel_mult]
        width = widths[-1]
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(width, width, c.norm_groups)]  # middle block
        for level in reversed(range(len(widths))):
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(width, widths[level], c.norm_groups))
                width = widths[level]
            if level != 0:
                blocks.append(Upsample(width))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(c.norm_groups, width)
        self.patch_size = c.patch_size
        self.conv_out = nn.Conv2d(width, 3 * c.patch_size**2, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.blocks(self.conv_in(z))  # (N, z_channels, h, w) -> (N, C_first, H/p, W/p)
        x = self.conv_out(F.silu(self.norm_out(h)))  # (N, 3 p^2, H/p, W/p), unbounded
        return F.pixel_shuffle(x, self.patch_size) if self.patch_size > 1 else x  # (N, 3, H, W)


# ------------------------------------------------------------------------------------------
# VQ-VAE
# ------------------------------------------------------------------------------------------


class VQVAE(nn.Module):
    """Encoder -> quantizer -> decoder, with the inverse path indices -> codes -> image."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantizer == "fsq":
            self.quantizer: VectorQuantizer | FSQ = FSQ(config.z_channels, config.fsq_levels)
        else:
            self.quantizer = VectorQuantizer(
                config.z_channels,
                config.codebook_size,
                codebook_dim=config.codebook_dim,
                l2_normalize=config.l2_normalize,
                decay=config.ema_decay,
                commitment_weight=config.commitment_weight,
                kmeans_init=config.kmeans_init,
                kmeans_iters=config.kmeans_iters,
                dead_code_threshold=config.dead_code_threshold,
            )

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(N, 3, H, W) in [-1, 1] -> quantized (N, z_channels, h, w), indices (N, h, w), aux."""
        return self.quantizer(self.encoder(x))

    def decode(self, quantized: Tensor) -> Tensor:
        """(N, z_channels, h, w) -> (N, 3, H, W), roughly in [-1, 1] (not clamped)."""
        return self.decoder(quantized)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(N, h, w) integer indices -> (N, z_channels, h, w) decoder inputs."""
        return self.quantizer.indices_to_codes(indices)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(N, h, w) integer indices -> (N, 3, H, W) images, roughly in [-1, 1]."""
        return self.decode(self.indices_to_codes(indices))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Reconstruction (N, 3, H, W), indices (N, h, w) and the quantizer's aux dict."""
        quantized, indices, aux = self.encode(x)
        return self.decode(quantized), indices, aux


def create_model(
    preset: str | os.PathLike[str] | TokenizerConfig = "cpu", **overrides: Any
) -> VQVAE:
    """A freshly initialised VQ-VAE from a preset name, a config JSON or a config."""
    return VQVAE(get_config(preset, **overrides))
