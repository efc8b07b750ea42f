"""DiT architectures as data: one dataclass, named presets, JSON in and out.

As in tokenizer/config.py: every field has a default and a comment; a preset names a handful
of overrides; every option is checked when the config is made, so a bad combination fails at
once with a message naming the field. The data sizes (latent_channels, latent_size, cond_dim)
come from the tokenizer and the store at training time, not from the preset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ["PRESETS", "DiffusionConfig", "get_config", "list_presets"]


@dataclass(frozen=True)
class DiffusionConfig:
    # --- data (filled in from the tokenizer and the store's CLIP model) ---
    latent_channels: int = 64  # the tokenizer's z_channels
    latent_size: int = 16  # the tokenizer's grid side
    cond_dim: int = 512  # the CLIP embedding dimension
    # --- transformer (DiT, Peebles & Xie 2023) ---
    patch_size: int = 2  # latent pixels per token side; tokens = (latent_size / patch_size)^2
    hidden_size: int = 384  # token width
    depth: int = 12  # transformer blocks
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # in attention and MLP; small collections overfit without it
    # --- conditioning (unCLIP-style CLIP-embedding conditioning) ---
    cond_drop_prob: float = 0.1  # share of training steps with the learned null embedding (CFG)
    cond_noise: float = 0.3  # max norm of the Gaussian noise added to the unit CLIP embedding
    # --- training ---
    ema_decay: float = 0.999  # EMA of the weights that sampling uses
    name: str = field(default="custom", compare=False)  # the preset it came from

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def grid_tokens(self) -> int:
        """Tokens per side: latent_size / patch_size."""
        return self.latent_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown diffusion config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> DiffusionConfig:
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown diffusion config keys {unknown}")
        return replace(self, **overrides)


def _validate(c: DiffusionConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"diffusion config {c.name!r}: {message}")

    for key in ("latent_channels", "latent_size", "cond_dim", "patch_size", "hidden_size",
                "depth", "num_heads"):
        value = getattr(c, key)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{key} must be a positive integer, got {value!r}")
    need(c.latent_size % c.patch_size == 0,
         f"latent_size {c.latent_size} must be a multiple of patch_size {c.patch_size}")
    need(c.hidden_size % c.num_heads == 0,
         f"hidden_size {c.hidden_size} must divide into num_heads {c.num_heads}")
    # 2-D sin-cos positions give a quarter of the width to each of sin/cos of x/y
    need(c.hidden_size % 4 == 0, f"hidden_size {c.hidden_size} must be a multiple of 4")
    need(c.mlp_ratio > 0, f"mlp_ratio must be > 0, got {c.mlp_ratio}")
    need(0.0 <= c.dropout < 1.0, f"dropout must be in [0, 1), got {c.dropout}")
    need(0.0 <= c.cond_drop_prob < 1.0, f"cond_drop_prob must be in [0, 1), got {c.cond_drop_prob}")
    need(c.cond_noise >= 0.0, f"cond_noise must be >= 0, got {c.cond_noise}")
    need(0.0 < c.ema_decay < 1.0, f"ema_decay must be in (0, 1), got {c.ema_decay}")


# ------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------

_PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    # Tests: the tiny tokenizer's 8x8 grid as 4x4 tokens; trains in minutes on one core.
    "tiny": dict(patch_size=2, hidden_size=128, depth=4, num_heads=4, dropout=0.0,
                 ema_decay=0.995),
    # 2 CPU cores: the cpu tokenizer's 16x16 grid as 8x8 tokens of 2x2; 7.5M parameters.
    "cpu": dict(patch_size=2, hidden_size=256, depth=6, num_heads=4, dropout=0.1,
                ema_decay=0.999),
    # DiT-S/2 and DiT-B/2 of the paper (33M / 130M parameters on 4-channel latents).
    "gpu-s": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6, dropout=0.1,
                  ema_decay=0.9999),
    "gpu-b": dict(patch_size=2, hidden_size=768, depth=12, num_heads=12, dropout=0.1,
                  ema_decay=0.9999),
}  # fmt: skip

PRESETS: dict[str, DiffusionConfig] = {
    name: DiffusionConfig(name=name, **overrides) for name, overrides in _PRESET_OVERRIDES.items()
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_config(preset: str | DiffusionConfig, **overrides: Any) -> DiffusionConfig:
    """A preset name or a config, with keyword overrides applied and validated."""
    if isinstance(preset, DiffusionConfig):
        config = preset
    elif preset in PRESETS:
        config = PRESETS[preset]
    else:
        raise ValueError(f"unknown diffusion preset {preset!r}: use one of {list_presets()}")
    return config.replace(**overrides) if overrides else config
