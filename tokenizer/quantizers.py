"""Quantizers: a VQ-VAE vector quantizer with an EMA codebook, and finite scalar quantization.

References:
    van den Oord, Vinyals, Kavukcuoglu 2017, "Neural Discrete Representation Learning"
        (VQ-VAE: nearest-code lookup, straight-through gradients, commitment loss, and the
        exponential-moving-average codebook update of its appendix A.1).
    Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN" (ViT-VQGAN:
        factorised low-dimensional, l2-normalised codes).
    Dhariwal et al. 2020 (Jukebox) and Zeghidour et al. 2021 (SoundStream): restarting dead
        codes from current encoder outputs; k-means initialisation on the first batch.
    Mentzer, Minnen, Agustsson, Tschannen 2023, "Finite Scalar Quantization: VQ-VAE Made
        Simple" (FSQ).

Both quantizers share one calling convention, as in vector-quantize-pytorch:
    quantized, indices, aux = quantizer(z)      # z, quantized: (N, C, H, W); indices: (N, H, W)
    z_q = quantizer.indices_to_codes(indices)   # the inverse of the lookup, (N, C, H, W)
`aux` holds scalar tensors: "loss" (add it to the training loss), "commitment_loss",
"perplexity" and "usage" (fraction of the code vocabulary used by this batch).
Lookups run in float32 even under autocast: argmin over nearly equal distances in bf16
would flip codes from one call to the next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FSQ", "VectorQuantizer", "batch_perplexity", "kmeans"]

Aux = dict[str, Tensor]


def batch_perplexity(indices: Tensor, num_codes: int) -> Tensor:
    """exp(entropy) of the code histogram: num_codes when use is uniform, 1 when collapsed."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).float()
    probs = counts / counts.sum().clamp(min=1)
    return torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())


def kmeans(
    x: Tensor, k: int, iters: int, *, spherical: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on x (N, D): centroids (k, D) and their final counts (k,).

    Seeded by k-means++ (Arthur & Vassilvitskii 2007: each next seed drawn with probability
    proportional to its squared distance to the seeds so far), which spreads the seeds over
    all clusters instead of doubling up in dense ones. `spherical` assigns by cosine and keeps
    centroids on the unit sphere, matching an l2-normalised codebook.
    """
    centroids = x[_kmeans_plus_plus(x, k, spherical, generator)].clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(max(iters, 1)):
        assign = _nearest(x, centroids, spherical)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        updated = sums / counts.clamp(min=1).unsqueeze(1)
        if spherical:
            updated = F.normalize(updated, dim=1)
        # An empty cluster keeps its old centroid; the dead-code restart deals with it later.
        centroids = torch.where(counts.unsqueeze(1) > 0, updated, centroids)
    return centroids, counts


def _kmeans_plus_plus(
    x: Tensor, k: int, spherical: bool, generator: torch.Generator | None
) -> Tensor:
    n = x.shape[0]
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    picks[0] = torch.randint(n, (1,), device=x.device, generator=generator)
    closest = torch.full((n,), float("inf"), device=x.device)
    for i in range(1, k):
        last = x[picks[i - 1]]
        if spherical:
            d2 = (2 - 2 * (x @ last)).clamp(min=0)  # |a - b|^2 for unit vectors
        else:
            d2 = (x - last).pow(2).sum(1)
        closest = torch.minimum(closest, d2)
        if float(closest.sum()) <= 0:  # fewer distinct points than k: repeat some
            picks[i:] = torch.randint(n, (k - i,), device=x.device, generator=generator)
            break
        picks[i] = torch.multinomial(closest, 1, generator=generator)
    return picks


def _nearest(x: Tensor, codebook: Tensor, spherical: bool) -> Tensor:
    if spherical:
        return (x @ codebook.t()).argmax(dim=1)  # unit vectors: max cosine = min distance
    # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 is the same for every code.
    return (codebook.pow(2).sum(1) - 2 * x @ codebook.t()).argmin(dim=1)


def _to_tokens(z: Tensor) -> Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, C, H, W) -> (N*H*W, C)


def _from_tokens(t: Tensor, n: int, h: int, w: int) -> Tensor:
    return t.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()  # -> (N, C, H, W)


# ------------------------------------------------------------------------------------------
# Vector quantizer with an EMA codebook
# ------------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with an EMA-updated codebook in a low-dimensional space.

    The encoder output (dim channels) is projected to `codebook_dim` (1x1 conv), optionally
    l2-normalised, and replaced by its nearest code; the code is projected back to `dim`.
    The codebook is not a parameter: it follows the encoder outputs assigned to it as an
    exponential moving average (decay `decay`), which the VQ-VAE paper found more stable than
    the codebook loss; only the commitment loss (weight `commitment_weight`) reaches the
    encoder. Codes whose EMA use falls below `dead_code_threshold` times a uniform share of
    the batch are re-seeded from current encoder outputs, so the codebook stays in use.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 1024,
        *,
        codebook_dim: int = 8,
        l2_normalize: bool = True,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.3,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if codebook_dim < 1 or (l2_normalize and codebook_dim < 2):
            raise ValueError(f"codebook_dim must be >= 1 (>= 2 with l2_normalize): {codebook_dim}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if not 0.0 <= dead_code_threshold < 1.0:
            raise ValueError(f"dead_code_threshold must be in [0, 1), got {dead_code_threshold}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.l2_normalize = l2_normalize
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps

        self.project_in = nn.Conv2d(dim, codebook_dim, 1)
        self.project_out = nn.Conv2d(codebook_dim, dim, 1)

        codebook = torch.randn(codebook_size, codebook_dim)
        if l2_normalize:
            codebook = F.normalize(codebook, dim=1)
        # EMA state of appendix A.1: N_i (cluster_size) and m_i (embed_sum), e_i = m_i / N_i.
        # N_i starts at 1 rather than 0 so that the first updates are weighted means, not
        # m_i / ~0 blow-ups; k-means init replaces both with real counts anyway.
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Aux]:
        n, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            x = _to_tokens(self.project_in(z.float()))  # (N*H*W, codebook_dim)
            if self.l2_normalize:
                x = F.normalize(x, dim=1)
            if self.training and not bool(self.initialized):
                self._kmeans_init(x.detach())

            indices = _nearest(x.detach(), self.codebook, self.l2_normalize)  # (N*H*W,)
            codes = self.codebook[indices]  # (N*H*W, codebook_dim)
            if self.training:
                self._ema_update(x.detach(), indices)
                self._restart_dead_codes(x.detach())

            # The encoder is pulled towards its codes; the codes follow by EMA, not gradient.
            commitment_loss = F.mse_loss(x, codes.detach())
            # Straight-through estimator: forward the code, backward the identity.
            x_q = x + (codes - x).detach()
            quantized = self.project_out(_from_tokens(x_q, n, h, w))  # (N, dim, H, W)

        indices = indices.reshape(n, h, w)
        aux = {
            "loss": self.commitment_weight * commitment_loss,
            "commitment_loss": commitment_loss.detach(),
            "perplexity": batch_perplexity(indices, self.codebook_size),
            "usage": torch.tensor(torch.unique(indices).numel() / self.codebook_size),
        }
        return quantized, indices, aux

    def indices_to_codes(self, indices: Tensor, *, project_out: bool = True) -> Tensor:
        """(N, H, W) integer indices -> (N, dim, H, W) decoder inputs, or with
        project_out=False the codebook vectors themselves, (N, codebook_dim, H, W)."""
        n, h, w = indices.shape
        codes = _from_tokens(self.codebook[indices.reshape(-1).long()], n, h, w)
        return self.project_out(codes) if project_out else codes

    # ---- codebook maintenance (training only, no gradients) ----

    @torch.no_grad()
    def _kmeans_init(self, x: Tensor) -> None:
        centroids, counts = kmeans(
            x, self.codebook_size, self.kmeans_iters, spherical=self.l2_normalize
        )
        self.codebook.copy_(centroids)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centroids * counts.unsqueeze(1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, x: Tensor, indices: Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, x)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps e_i finite for a code that got nothing for a long time.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        codebook = self.embed_sum / smoothed.unsqueeze(1)
        if self.l2_normalize:
            codebook = F.normalize(codebook, dim=1)
        self.codebook.copy_(codebook)

    @torch.no_grad()
    def _restart_dead_codes(self, x: Tensor) -> None:
        if self.dead_code_threshold <= 0:
            return
        uniform_share = x.shape[0] / self.codebook_size
        dead = self.cluster_size < self.dead_code_threshold * uniform_share
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        if x.shape[0] >= num_dead:
            pick = torch.randperm(x.shape[0], device=x.device)[:num_dead]
        else:
            pick = torch.randint(x.shape[0], (num_dead,), device=x.device)
        samples = x[pick]
        # A restarted code is credited exactly the threshold: if no encoder output picks it
        # in the next batch, its EMA falls below the threshold and it is re-drawn at once,
        # so a dead code keeps sampling current outputs until it lands where data is.
        credit = self.dead_code_threshold * uniform_share
        self.codebook[dead] = samples
        self.cluster_size[dead] = credit
        self.embed_sum[dead] = samples * credit


# ------------------------------------------------------------------------------------------
# Finite scalar quantization
# ------------------------------------------------------------------------------------------


def _round_ste(x: Tensor) -> Tensor:
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    """Finite scalar quantization: each of len(levels) channels is bounded and rounded.

    The implicit codebook is the grid of prod(levels) points: every code is used by
    construction, and there is no codebook to learn, no commitment loss and no restart.
    """

    def __init__(self, dim: int, levels: Sequence[int] = (8, 5, 5, 5), *, eps: float = 1e-3):
        super().__init__()
        levels = list(levels)
        if not levels or any(int(v) != v or v < 2 for v in levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.dim = dim
        self.levels_list = levels
        self.eps = eps
        self.project_in = nn.Conv2d(dim, len(levels), 1)
        self.project_out = nn.Conv2d(len(levels), dim, 1)
        # Mixed radix: index = sum_i digit_i * prod(levels[:i]).
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0)
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def num_codes(self) -> int:
        return math.prod(self.levels_list)

    def bound(self, z: Tensor) -> Tensor:
        """Squash each channel into (-L/2, L/2) so that rounding gives exactly L values.

        For even L the interval is shifted by half a step (values -L/2 .. L/2 - 1), and the
        tanh is shifted so that z = 0 still maps to 0.
        """
        # (1 - eps): tanh never quite reaches a rounding boundary, so exactly L values occur.
        half_l = (self.levels - 1) * (1 - self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Aux]:
        n, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            x = _to_tokens(self.project_in(z.float()))  # (N*H*W, len(levels))
            digits = _round_ste(self.bound(x))  # integers in [-L//2, (L-1)//2], STE backward
            half_width = self.levels // 2
            codes = digits / half_width  # in [-1, 1]
            indices = self._digits_to_indices(digits.detach())
            quantized = self.project_out(_from_tokens(codes, n, h, w))  # (N, dim, H, W)
        indices = indices.reshape(n, h, w)
        zero = z.new_zeros((), dtype=torch.float32)
        aux = {
            "loss": zero,
            "commitment_loss": zero,
            "perplexity": batch_perplexity(indices, self.num_codes),
            "usage": torch.tensor(torch.unique(indices).numel() / self.num_codes),
        }
        return quantized, indices, aux

    def _digits_to_indices(self, digits: Tensor) -> Tensor:
        shifted = (digits + self.levels // 2).long()  # 0 .. L-1
        return (shifted * self.basis).sum(dim=-1)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """(N, len(levels), H, W) grid points in [-1, 1] -> (N, H, W) indices."""
        n, _, h, w = codes.shape
        digits = (_to_tokens(codes) * (self.levels // 2)).round()
        return self._digits_to_indices(digits).reshape(n, h, w)

    def indices_to_codes(self, indices: Tensor, *, project_out: bool = True) -> Tensor:
        """(N, H, W) integer indices -> (N, dim, H, W) decoder inputs, or with
        project_out=False the grid points themselves, (N, len(levels), H, W) in [-1, 1]."""
        n, h, w = indices.shape
        flat = indices.reshape(-1, 1).long()
        digits = (flat // self.basis) % self.levels - self.levels // 2
        codes = _from_tokens(digits.float() / (self.levels // 2), n, h, w)
        return self.project_out(codes) if project_out else codes
