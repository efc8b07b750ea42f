"""Checkpoints: weights in safetensors, the config beside them in JSON, and a tokenizer id.

A checkpoint folder holds

    tokenizer.safetensors   every parameter and buffer (the EMA codebook state included);
                            its metadata repeats the config, so the file alone is enough
    tokenizer.json          {"config": {...}, "step": ..., "metrics": {...}, ...}
    train-state.pt          optimizer and schedule state, for resuming (training only)

The tokenizer id is the sha256 of tokenizer.safetensors: it names exactly the weights that
produced a code grid, so stored codes can be checked against the tokenizer decoding them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vqret.retrieval.atomic import atomic_write
from vqret.retrieval.content_hash import file_sha256
from vqret.retrieval.weights import weights_file

from .config import TokenizerConfig

if TYPE_CHECKING:  # torch: not to find a checkpoint or its id (a no-op `tokenizer encode`)
    import torch

    from .model import VQVAE

__all__ = [
    "CONFIG_FILE",
    "TRAIN_STATE_FILE",
    "WEIGHTS_FILE",
    "load_checkpoint",
    "read_checkpoint_info",
    "resolve_checkpoint",
    "save_checkpoint",
    "tokenizer_id",
]

WEIGHTS_FILE = "tokenizer.safetensors"
CONFIG_FILE = "tokenizer.json"
TRAIN_STATE_FILE = "train-state.pt"
FORMAT = "vqret-tokenizer/1"


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The weights file for a checkpoint folder, its .safetensors or its .json."""
    return weights_file(
        path, WEIGHTS_FILE, "no tokenizer checkpoint here (train one with `vqret tokenizer train`)"
    )


def tokenizer_id(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of the checkpoint's weights file."""
    return file_sha256(resolve_checkpoint(path))


def save_checkpoint(
    model: VQVAE, folder: str | os.PathLike[str], info: dict[str, Any] | None = None
) -> Path:
    """Write weights and config JSON into `folder` (each replaced atomically); returns the
    weights path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(model.config.to_dict())
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    metadata = {"format": FORMAT, "config": config_json}
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    sidecar = {"format": FORMAT, "config": model.config.to_dict(), **(info or {})}
    text = json.dumps(sidecar, indent=2)
    atomic_write(folder / CONFIG_FILE, text)
    return weights


def read_checkpoint_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar JSON (config, step, metrics), or the config from the weights' metadata."""
    weights = resolve_checkpoint(path)
    sidecar = weights.with_suffix(".json")
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{weights}: safetensors file without a tokenizer config")
    return {"format": metadata.get("format"), "config": json.loads(metadata["config"])}


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> VQVAE:
    """The model of a checkpoint, in eval mode, on `device`."""
    weights = resolve_checkpoint(path)
    info = read_checkpoint_info(weights)
    config_data = dict(info["config"])
    config = TokenizerConfig.from_dict(config_data)
    from safetensors.torch import load_file

    from .model import VQVAE

    model = VQVAE(config)
    state = load_file(str(weights), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not fit the config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return model.to(device).eval()
