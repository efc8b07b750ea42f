"""The tokenizer as users call it: images in, uint16 code grids out, and back.

    from vqret.tokenizer.api import Tokenizer
    tok = Tokenizer.load("runs/tok")                # a checkpoint folder or its .safetensors
    codes = tok.encode(["a.jpg", "b.png"])          # (2, 16, 16) uint16
    images = tok.decode(codes)                      # (2, 64, 64, 3) uint8
    tok.id                                          # sha256 of the weights: tag stored codes

Arrays in, arrays out: what the store keeps is exactly `encode`'s output, and `decode` takes
it back. Inference runs in float32 in eval mode (no EMA updates, no randomness), so the same
images in the same batch always give the same codes and the same codes the same pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from vqret.retrieval.device import resolve_device

from .checkpoint import load_checkpoint, read_checkpoint_info, resolve_checkpoint, tokenizer_id
from .config import TokenizerConfig
from .data import ImageInput, decode_images, from_unit, to_unit
from .model import VQVAE

__all__ = ["Tokenizer"]


class Tokenizer:
    """A trained VQ-VAE with array-in, array-out encode and decode."""

    def __init__(
        self,
        model: VQVAE,
        *,
        id: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.id = id  # sha256 of the weights file when loaded from one
        self.batch_size = batch_size
        self.info: dict[str, Any] = {}  # the checkpoint's JSON: config, step, metrics
        self.path: Path | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        batch_size: int = 64,
    ) -> Tokenizer:
        """From a checkpoint folder, its tokenizer.safetensors or its tokenizer.json."""
        weights = resolve_checkpoint(path)
        device = resolve_device(device)
        tok = cls(
            load_checkpoint(weights, device),
            id=tokenizer_id(weights),
            device=device,
            batch_size=batch_size,
        )
        tok.info = read_checkpoint_info(weights)
        tok.path = Path(weights)
        return tok

    # ---- sizes ----

    @property
    def config(self) -> TokenizerConfig:
        return self.model.config

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def num_codes(self) -> int:
        return self.model.num_codes

    # ---- images <-> codes ----

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Paths, PIL images or uint8 (H, W, 3) arrays -> uint8 (N, 3, S, S): short side
        resized to image_size, centre square. Unloadable files raise ImageLoadError."""
        batch, _ = decode_images(images, self.image_size)
        return batch

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageInput] | torch.Tensor) -> np.ndarray:
        """Images -> code grids, uint16 (N, grid, grid).

        `images`: paths, PIL images, uint8 (H, W, 3) arrays, or a uint8 (N, 3, S, S) tensor
        already at image_size.
        """
        if isinstance(images, torch.Tensor):
            pixels = images
        else:
            pixels = self.preprocess(list(images))
        expected = (3, self.image_size, self.image_size)
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"expected uint8 (N, 3, {self.image_size}, {self.image_size}), got "
                f"{pixels.dtype} {tuple(pixels.shape)}"
            )
        grids = []
        for start in range(0, pixels.shape[0], self.batch_size):
            batch = to_unit(pixels[start : start + self.batch_size].to(self.device))
            _, indices, _ = self.model.encode(batch)
            grids.append(indices.cpu().numpy().astype(np.uint16))
        if not grids:
            return np.zeros((0, self.grid_size, self.grid_size), dtype=np.uint16)
        return np.concatenate(grids)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Code grids (N, grid, grid) or one grid (grid, grid) -> uint8 images (N, S, S, 3)."""
        codes = np.asarray(codes)
        if codes.ndim == 2:
            codes = codes[None]
        g = self.grid_size
        if codes.ndim != 3 or codes.shape[1:] != (g, g):
            raise ValueError(f"codes must be (N, {g}, {g}) or ({g}, {g}), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(
                f"codes out of range for this tokenizer's {self.num_codes} codes "
                f"(min {codes.min()}, max {codes.max()}): were they made by another one?"
            )
        out = []
        for start in range(0, codes.shape[0], self.batch_size):
            indices = torch.from_numpy(codes[start : start + self.batch_size].astype(np.int64))
            recon = self.model.decode_indices(indices.to(self.device))
            out.append(from_unit(recon).permute(0, 2, 3, 1).cpu().numpy())
        if not out:
            return np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return np.concatenate(out)

    # ---- images <-> continuous latents (what the diffusion model generates) ----

    @torch.inference_mode()
    def latents(self, images: Sequence[ImageInput] | torch.Tensor) -> np.ndarray:
        """Images -> the encoder's continuous pre-quantization outputs, float32
        (N, z_channels, grid, grid). Same inputs as `encode`."""
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(list(images))
        self._check_pixels(pixels)
        z = self.config.z_channels
        out = [
            self.model.encoder(to_unit(pixels[s : s + self.batch_size].to(self.device)))
            .float()
            .cpu()
            .numpy()
            for s in range(0, pixels.shape[0], self.batch_size)
        ]
        empty = np.zeros((0, z, self.grid_size, self.grid_size), dtype=np.float32)
        return np.concatenate(out) if out else empty

    @torch.inference_mode()
    def decode_latents(self, latents: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Continuous latents (N, z_channels, grid, grid) -> (uint8 images (N, S, S, 3), uint16
        codes (N, grid, grid)). The latents go through the quantizer first, as in Latent
        Diffusion on VQ models, so a generated image also has its exact code grid."""
        z = torch.as_tensor(np.asarray(latents, dtype=np.float32))
        shape = (self.config.z_channels, self.grid_size, self.grid_size)
        if z.ndim != 4 or tuple(z.shape[1:]) != shape:
            raise ValueError(f"latents must be (N, {', '.join(map(str, shape))}), got "
                             f"{tuple(z.shape)}")
        images, codes = [], []
        for start in range(0, z.shape[0], self.batch_size):
            quantized, indices, _ = self.model.quantizer(z[start : start + self.batch_size]
                                                         .to(self.device))
            recon = self.model.decode(quantized)
            images.append(from_unit(recon).permute(0, 2, 3, 1).cpu().numpy())
            codes.append(indices.cpu().numpy().astype(np.uint16))
        if not images:
            s, g = self.image_size, self.grid_size
            return np.zeros((0, s, s, 3), np.uint8), np.zeros((0, g, g), np.uint16)
        return np.concatenate(images), np.concatenate(codes)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"expected uint8 (N, 3, {self.image_size}, {self.image_size}), got "
                f"{pixels.dtype} {tuple(pixels.shape)}"
            )

    def reconstruct(self, images: Sequence[ImageInput] | torch.Tensor) -> np.ndarray:
        """decode(encode(images)): uint8 (N, S, S, 3)."""
        return self.decode(self.encode(images))

    @staticmethod
    def to_pil(images: np.ndarray) -> list[Image.Image]:
        """uint8 (N, S, S, 3) -> PIL images, e.g. `tok.to_pil(tok.decode(codes))[0].save(p)`."""
        return [Image.fromarray(a, "RGB") for a in np.asarray(images)]
