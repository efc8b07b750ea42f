"""DiT checkpoints: EMA weights in safetensors, with everything needed to use them.

A checkpoint folder (default STORE/diffusion/) holds

    diffusion.safetensors   the EMA weights sampling uses; its metadata repeats the facts below,
                            so the file alone is enough
    diffusion.json          {"config", "latent_scale", "tokenizer": {"id", "path"},
                             "clip": {"model", "weights_id", "embed_dim"}, "step", ...}
    train-state.pt          raw weights, EMA, optimizer and step, for resuming (training only)
    threshold.json          the search fallback's calibrated threshold (diffusion/fallback.py)

`latent_scale` multiplies the tokenizer's latents to unit variance before diffusion (Latent
Diffusion's scale_by_std) and divides generated latents back. The tokenizer id and the CLIP
model are those the model was trained with: generating with another tokenizer or another
CLIP space would give noise, so loading checks them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from vqret.retrieval.atomic import atomic_write
from vqret.retrieval.weights import weights_file

from .config import DiffusionConfig
from .model import DiT
from .paths import WEIGHTS_NAME

__all__ = [
    "INFO_FILE",
    "TRAIN_STATE_FILE",
    "WEIGHTS_FILE",
    "CheckpointInfo",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]

WEIGHTS_FILE = WEIGHTS_NAME
INFO_FILE = "diffusion.json"
TRAIN_STATE_FILE = "train-state.pt"
FORMAT = "vqret-diffusion/1"


@dataclass
class CheckpointInfo:
    config: DiffusionConfig
    latent_scale: float  # latents * latent_scale have unit variance
    tokenizer_id: str  # sha256 of the tokenizer's weights file
    clip: dict[str, Any]  # the store's CLIP model: model, weights_id, embed_dim
    tokenizer_path: str | None = None  # where the tokenizer was when training (a hint)
    step: int = 0
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # loss, images, ...

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["tokenizer"] = {"id": d.pop("tokenizer_id"), "path": d.pop("tokenizer_path")}
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Path) -> CheckpointInfo:
        try:
            return cls(
                config=DiffusionConfig.from_dict(d["config"]),
                latent_scale=float(d["latent_scale"]),
                tokenizer_id=str(d["tokenizer"]["id"]),
                tokenizer_path=d["tokenizer"].get("path"),
                clip=dict(d["clip"]),
                step=int(d.get("step", 0)),
                train_seconds=float(d.get("train_seconds", 0.0)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: not a vqret diffusion checkpoint (missing {e})") from e


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The weights file of a checkpoint folder, its .safetensors or its .json."""
    return weights_file(
        path, WEIGHTS_FILE, "no diffusion model here (train one with `vqret diffusion train`)"
    )


def save_checkpoint(
    model: DiT, info: CheckpointInfo, folder: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model`'s weights (EMA ones, normally) and `info` into `folder`; returns the
    weights path. `dtype` float16 halves the file (the test fixture uses it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info.config = model.config
    facts = info.to_dict()
    tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    metadata = {"format": FORMAT, "info": json.dumps(facts)}
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(folder / INFO_FILE, json.dumps(facts, indent=2))
    return weights


def read_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    weights = resolve_checkpoint(path)
    sidecar = weights.with_suffix(".json")
    if sidecar.is_file():
        try:
            return CheckpointInfo.from_dict(json.loads(sidecar.read_text()), sidecar)
        except json.JSONDecodeError as e:
            raise ValueError(f"{sidecar}: not valid JSON ({e})") from e
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
    if "info" not in metadata:
        raise ValueError(f"{weights}: safetensors file without diffusion metadata")
    return CheckpointInfo.from_dict(json.loads(metadata["info"]), weights)


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[DiT, CheckpointInfo]:
    """The model (float32, eval mode, on `device`) and its facts."""
    weights = resolve_checkpoint(path)
    info = read_info(weights)
    model = DiT(info.config)
    state = {k: v.float() for k, v in load_file(str(weights), device="cpu").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not fit the config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.to(device).eval(), info
