"""Tokenizer architectures as data: one dataclass, a few named presets, JSON in and out.

Like open_clip's model configs: every field has a default and a comment, a preset is a name
for a handful of overrides, and `add_config(path)` registers a user's JSON under its stem.
Every option is checked in `TokenizerConfig.__post_init__`, so a bad combination fails when the
config is made (with a message naming the field), not deep inside a training run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "PRESETS",
    "TokenizerConfig",
    "add_config",
    "get_config",
    "list_presets",
]

QUANTIZERS = ("vq", "fsq")
# Codes are stored as uint16 grids, so no codebook may be larger than this.
MAX_CODEBOOK_SIZE = 65536


@dataclass(frozen=True)
class TokenizerConfig:
    # --- image and conv body (Esser et al. 2021 layout: resnet blocks, GroupNorm, SiLU) ---
    image_size: int = 64  # square input side in pixels
    patch_size: int = 1  # space-to-depth factor before the first conv (and back after the last)
    channels: int = 64  # width of the first resolution level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; one 2x down per step
    num_res_blocks: int = 1  # resnet blocks per level (encoder; the decoder mirrors it)
    z_channels: int = 64  # encoder output width, projected down to codebook_dim for lookup
    norm_groups: int = 8  # GroupNorm groups; every width must divide by it
    # --- quantizer ---
    quantizer: str = "vq"  # "vq": EMA codebook (van den Oord 2017) | "fsq" (Mentzer 2023)
    codebook_size: int = 1024  # vq: number of codes (<= 65536, codes are uint16)
    codebook_dim: int = 8  # vq: low-dim lookup space (ViT-VQGAN's factorised codes)
    l2_normalize: bool = True  # vq: cosine lookup on the unit sphere; keeps codes alive
    ema_decay: float = 0.99  # vq: codebook EMA decay (the VQ-VAE paper's gamma)
    commitment_weight: float = 0.25  # vq: beta in the VQ-VAE loss
    kmeans_init: bool = True  # vq: k-means on the first training batch instead of random codes
    kmeans_iters: int = 10  # vq
    dead_code_threshold: float = 0.3  # vq: restart codes whose EMA use < this x a uniform share
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # fsq: levels per dim; codebook = their product
    name: str = field(default="custom", compare=False)  # the preset or file it came from

    def __post_init__(self) -> None:
        # JSON gives lists: store tuples so configs stay hashable and compare equal.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "fsq_levels", tuple(self.fsq_levels))
        _validate(self)

    # ---- derived sizes ----

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid: image_size / downsample."""
        return self.image_size // self.downsample

    @property
    def num_codes(self) -> int:
        """Size of the code vocabulary, whichever quantizer."""
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    # ---- data in and out ----

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["fsq_levels"] = list(self.fsq_levels)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown tokenizer config keys {unknown}; known keys: {sorted(known)}"
            )
        return cls(**data)

    def replace(self, **overrides: Any) -> TokenizerConfig:
        """A copy with some fields changed, validated again."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown tokenizer config keys {unknown}")
        return replace(self, **overrides)


def _validate(c: TokenizerConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"tokenizer config {c.name!r}: {message}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(c.quantizer in QUANTIZERS, f"quantizer must be one of {QUANTIZERS}, got {c.quantizer!r}")
    positive = ("image_size", "patch_size", "channels", "num_res_blocks", "z_channels")
    for key in (*positive, "norm_groups"):
        value = getattr(c, key)
        need(is_int(value) and value >= 1, f"{key} must be a positive integer, got {value!r}")
    need(len(c.channel_mult) >= 1, "channel_mult needs at least one level")
    need(
        all(is_int(m) and m >= 1 for m in c.channel_mult),
        f"channel_mult must hold positive integers, got {list(c.channel_mult)}",
    )
    need(
        c.image_size % c.downsample == 0 and c.grid_size >= 2,
        f"image_size {c.image_size} must be a multiple of the downsampling factor "
        f"{c.downsample} (patch_size * 2 ** (len(channel_mult) - 1)) and give a grid of at "
        "least 2x2",
    )
    widths = [c.channels * m for m in c.channel_mult] + [c.z_channels]
    need(
        all(w % c.norm_groups == 0 for w in widths),
        f"every width {sorted(set(widths))} must be divisible by norm_groups={c.norm_groups}",
    )
    if c.quantizer == "vq":
        need(
            is_int(c.codebook_size) and 2 <= c.codebook_size <= MAX_CODEBOOK_SIZE,
            f"codebook_size must be an integer in [2, {MAX_CODEBOOK_SIZE}] (codes are "
            f"stored as uint16), got {c.codebook_size!r}",
        )
        need(is_int(c.codebook_dim) and c.codebook_dim >= 1, "codebook_dim must be >= 1")
        need(
            not (c.l2_normalize and c.codebook_dim < 2),
            "l2_normalize needs codebook_dim >= 2 (a unit 1-d vector is just a sign)",
        )
        need(0.0 < c.ema_decay < 1.0, f"ema_decay must be in (0, 1), got {c.ema_decay}")
        need(c.commitment_weight >= 0.0, "commitment_weight must be >= 0")
        need(is_int(c.kmeans_iters) and c.kmeans_iters >= 0, "kmeans_iters must be >= 0")
        need(
            0.0 <= c.dead_code_threshold < 1.0,
            "dead_code_threshold is a fraction of a uniform share: use 0 (off) to < 1, "
            f"got {c.dead_code_threshold}",
        )
    else:
        need(
            len(c.fsq_levels) >= 1 and all(is_int(v) and v >= 2 for v in c.fsq_levels),
            f"fsq_levels must be integers >= 2, got {list(c.fsq_levels)}",
        )
        need(
            math.prod(c.fsq_levels) <= MAX_CODEBOOK_SIZE,
            f"fsq_levels {list(c.fsq_levels)} give {math.prod(c.fsq_levels)} codes, more "
            f"than {MAX_CODEBOOK_SIZE} (codes are stored as uint16)",
        )


# ------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------

# Overrides of the dataclass defaults. Sizes were chosen for the compute they run on: "cpu"
# trains to its targets in ~25 minutes on 2 cores (see README, Tokenizer); "gpu" is the
# 128 px recipe, same 16x16 grid so a store row holds the same 256 codes either way.
_PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    # For tests: trains in seconds on drawn shapes.
    "tiny": dict(
        image_size=32, channels=16, channel_mult=(1, 2, 2), z_channels=32,
        codebook_size=64, codebook_dim=4, kmeans_iters=5,
    ),
    "tiny-fsq": dict(
        image_size=32, channels=16, channel_mult=(1, 2, 2), z_channels=32,
        quantizer="fsq", fsq_levels=(4, 4, 4),
    ),
    # 64x64 -> 16x16 grid of 1024 codes. Space-to-depth first (patch_size 2): the widest
    # convs run at 32x32 with 64 channels, ~2x the images/s of 3x3 convs at full resolution.
    "cpu": dict(
        image_size=64, patch_size=2, channels=64, channel_mult=(1, 2), num_res_blocks=1,
        z_channels=64, codebook_size=1024, codebook_dim=8,
    ),
    "cpu-fsq": dict(
        image_size=64, patch_size=2, channels=64, channel_mult=(1, 2), num_res_blocks=1,
        z_channels=64, quantizer="fsq", fsq_levels=(8, 5, 5, 5),
    ),
    # 128x128 -> 16x16 grid of 4096 codes: the cpu body, twice as wide and deep, one more
    # level. Not yet trained by us (see README, Tokenizer: GPU recipe).
    "gpu": dict(
        image_size=128, patch_size=2, channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
        z_channels=128, norm_groups=32, codebook_size=4096, codebook_dim=8,
    ),
}  # fmt: skip

PRESETS: dict[str, TokenizerConfig] = {
    name: TokenizerConfig(name=name, **overrides) for name, overrides in _PRESET_OVERRIDES.items()
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def add_config(path: str | os.PathLike[str]) -> TokenizerConfig:
    """Register the JSON config at `path` as a preset named after the file's stem."""
    path = Path(path)
    config = _read_json_config(path)
    PRESETS[config.name] = config
    return config


def get_config(
    preset: str | os.PathLike[str] | TokenizerConfig, **overrides: Any
) -> TokenizerConfig:
    """A preset name, a JSON file or a config, with keyword overrides applied and validated."""
    if isinstance(preset, TokenizerConfig):
        config = preset
    elif str(preset) in PRESETS:
        config = PRESETS[str(preset)]
    elif str(preset).endswith(".json") or Path(preset).is_file():
        config = _read_json_config(Path(preset))
    else:
        raise ValueError(
            f"unknown tokenizer preset {str(preset)!r}: use one of {list_presets()} "
            "or the path of a config JSON"
        )
    return config.replace(**overrides) if overrides else config


def _read_json_config(path: Path) -> TokenizerConfig:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"{path}: cannot read tokenizer config ({err.strerror or err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a tokenizer config must be a JSON object")
    data.setdefault("name", path.stem)
    return TokenizerConfig.from_dict(data)
