"""A Diffusion Transformer over the tokenizer's continuous latents, conditioned on CLIP.

References:
    Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT): patchified
        latents, fixed 2-D sin-cos positions, sinusoidal timestep embedding through an MLP,
        and adaLN-Zero blocks (the conditioning vector regresses a shift, a scale and a gate
        per sub-layer; the gates start at zero so every block starts as the identity).
    Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents"
        (unCLIP): conditioning on a CLIP image embedding, dropped for classifier-free
        guidance, and noise augmentation of that embedding.
    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance".

Written from the papers for this project (the DiT authors' code is CC-BY-NC).
Shapes: latents (N, C, G, G); tokens (N, T, D) with T = (G / patch_size)^2; conditioning
(N, D); CLIP embeddings (N, E); time t in [0, 1], (N,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DiffusionConfig, get_config

__all__ = ["DiT", "create_model", "sincos_2d_positions", "timestep_frequencies"]


# ------------------------------------------------------------------------------------------
# Fixed embeddings
# ------------------------------------------------------------------------------------------


def timestep_frequencies(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal features of t (N,) -> (N, dim).

    t in [0, 1] is scaled by 1000 first, so the frequencies span the range they were chosen
    for (the 1000 discrete steps of DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def sincos_2d_positions(dim: int, grid: int) -> Tensor:
    """Fixed 2-D positions (grid * grid, dim): half the width encodes the row, half the
    column, each as 1-D sin-cos features (as in MAE and DiT)."""
    def one_axis(positions: Tensor, width: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
        args = positions.double()[:, None] * omega[None]  # (P, width/2)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([one_axis(rows.reshape(-1), dim // 2), one_axis(cols.reshape(-1), dim // 2)],
                    dim=1)
    return emb.float()  # (T, dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (N, T, D) normalised, then scaled and shifted per sample (N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ------------------------------------------------------------------------------------------
# Conditioning
# ------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_frequencies(t, self.frequency_dim))  # (N,) -> (N, D)


class EmbeddingConditioner(nn.Module):
    """CLIP embedding (N, E) -> (N, D), with a learned null for classifier-free guidance.

    In training, a share `drop_prob` of the samples get the null embedding instead (so one
    model learns both the conditional and the unconditional velocity), and the others get
    Gaussian noise of a random norm up to `noise` on their unit embedding: the model then
    answers for a neighbourhood of each image embedding, which carries it over to the text
    embeddings and blended priors it is asked about at generation time (unCLIP, Kandinsky).
    """

    def __init__(self, cond_dim: int, hidden: int, drop_prob: float, noise: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null = nn.Parameter(torch.zeros(hidden))
        nn.init.normal_(self.null, std=0.02)
        self.drop_prob = drop_prob
        self.noise = noise

    def forward(self, emb: Tensor | None, n: int, drop: Tensor | None = None) -> Tensor:
        """`emb` None: all null. `drop` (N,) bool: which samples get the null embedding
        (training draws it when None)."""
        if emb is None:
            return self.null[None].expand(n, -1)
        if self.training and self.noise > 0:
            noise = F.normalize(torch.randn_like(emb), dim=1)
            level = torch.rand(emb.shape[0], 1, device=emb.device) * self.noise
            emb = F.normalize(emb + level * noise, dim=1)
        out = self.mlp(emb)
        if drop is None and self.training and self.drop_prob > 0:
            drop = torch.rand(emb.shape[0], device=emb.device) < self.drop_prob
        if drop is not None:
            out = torch.where(drop[:, None], self.null[None].to(out.dtype), out)
        return out  # (N, D)


# ------------------------------------------------------------------------------------------
# Transformer
# ------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, D/H)
        p = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        # No learned affine in the norms: adaLN supplies scale and shift per sample.
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )
        # shift, scale, gate for attention, then for the MLP
        self.adaln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # adaLN-Zero: zero gates make the block the identity at init, the paper's best choice
        nn.init.zeros_(self.adaln_modulation[-1].weight)
        nn.init.zeros_(self.adaln_modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))  # (N, T, D)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * channels)
        # Zero output at init: the first prediction is 0 for every input (as in the paper).
        for layer in (self.adaln_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaln_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)


# ------------------------------------------------------------------------------------------
# DiT
# ------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Predicts the flow-matching velocity of noisy latents, given t and a CLIP embedding."""

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.latent_channels, c.hidden_size, c.patch_size,
                                     stride=c.patch_size)
        # Derived from the config, so not saved: checkpoints hold learned weights only.
        self.register_buffer("pos_embed", sincos_2d_positions(c.hidden_size, c.grid_tokens),
                             persistent=False)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.cond_embedder = EmbeddingConditioner(c.cond_dim, c.hidden_size, c.cond_drop_prob,
                                                  c.cond_noise)
        self.blocks = nn.ModuleList(
            DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.dropout) for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.latent_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier-uniform linears (the ViT init) except where adaLN-Zero asked for zeros, which
        # the modules set themselves and which we keep; the patch conv is a linear too.
        zeroed = {id(b.adaln_modulation[-1]) for b in self.blocks}
        zeroed |= {id(self.final_layer.adaln_modulation[-1]), id(self.final_layer.linear)}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in zeroed:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embedder.mlp, self.cond_embedder.mlp):
            nn.init.normal_(layer[0].weight, std=0.02)
            nn.init.normal_(layer[2].weight, std=0.02)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p*p*C) -> (N, C, G, G)."""
        c, p, g = self.config.latent_channels, self.config.patch_size, self.config.grid_tokens
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def condition(self, t: Tensor, emb: Tensor | None, drop: Tensor | None = None) -> Tensor:
        """c = t_emb + MLP(clip_emb) (or + the null embedding): (N, D)."""
        return self.t_embedder(t) + self.cond_embedder(emb, t.shape[0], drop)

    def forward(
        self, x: Tensor, t: Tensor, emb: Tensor | None, drop: Tensor | None = None
    ) -> Tensor:
        """x (N, C, G, G) noisy latents, t (N,), emb (N, E) or None -> velocity (N, C, G, G)."""
        c = self.condition(t, emb, drop)  # (N, D)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))  # (N, C, G, G)


def create_model(preset: str | DiffusionConfig = "cpu", **overrides) -> DiT:
    """A freshly initialised DiT from a preset name or config, with overrides."""
    return DiT(get_config(preset, **overrides))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
