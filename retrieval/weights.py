"""Where a model's weights come from: an open_clip name or config file, a pretrained tag
(through the Hugging Face cache, downloaded once when the network allows) or a local file;
and the weights file of one of vqret's own checkpoint folders (tokenizer, DiT).

Offline with nothing cached, loading fails at once with one message that says how to pass a
local file, instead of huggingface_hub's retry loop. Torch-free: open_clip is imported only
by the functions that need it, and `weights_file` answers `vqret search`'s cold path.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .content_hash import file_sha256
from .model_spec import ModelConfigError, WeightsUnavailableError
from .one_line import first_line

# `--pretrained none` builds the architecture with random weights: for speed benchmarks only.
RANDOM_WEIGHTS = "none"


def register_model_config(model: str, config: dict[str, Any] | None = None) -> str:
    """Return the open_clip name for `model`, registering a config file (or dict) first.

    A path to a JSON file registers under the file's stem, as open_clip's `add_model_config`.
    """
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    if config is not None:
        # A store carries its model's config, so it can be searched where the file is gone.
        _MODEL_CONFIGS.setdefault(model, config)
        return model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ModelConfigError(f"model config file not found: {model}")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{model}: not a readable JSON model config ({e})") from e
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ModelConfigError(
                f"{model}: an open_clip model config needs embed_dim, vision_cfg and text_cfg"
            )
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ModelConfigError(
            f"unknown model {model!r}: pass an open_clip name (see `open_clip.list_models()`) "
            "or the path of a model-config JSON file"
        )
    return model


def model_config_json(name: str) -> dict[str, Any] | None:
    from open_clip import get_model_config

    return get_model_config(name)


def _offline_hint(model: str, pretrained: str) -> str:
    return (
        f"can't load weights {pretrained!r} for model {model!r}: offline and not in the "
        "Hugging Face cache. Pass a local checkpoint with --pretrained /path/to/weights"
        ".safetensors (or a .pt/.bin state dict), or pre-fill the cache (HF_HOME) on a "
        "machine with internet"
    )


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    """One quick connection attempt, so that offline machines fail fast."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_weights(model: str, pretrained: str) -> tuple[str | None, dict[str, Any], str]:
    """Find the checkpoint file for (model, pretrained).

    Returns (checkpoint path or None for random weights, the tag's preprocess and quick_gelu
    settings, weights id). Raises WeightsUnavailableError with a one-line, actionable message.
    """
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if pretrained in ("", RANDOM_WEIGHTS, "random"):
        return None, {}, RANDOM_WEIGHTS
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve()), {}, "sha256:" + file_sha256(path)
    looks_like_path = os.sep in pretrained or pretrained.endswith(
        (".safetensors", ".pt", ".pth", ".bin")
    )
    if looks_like_path:
        raise WeightsUnavailableError(f"weights file not found: {pretrained}")
    cfg = get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = ", ".join(list_pretrained_tags_by_model(model)) or "none"
        raise WeightsUnavailableError(
            f"unknown pretrained tag {pretrained!r} for model {model!r} (known tags: {tags}); "
            "or pass a local checkpoint file with --pretrained"
        )
    # What open_clip would merge in from the tag when it loads by tag (we load by file).
    keys = ("mean", "std", "interpolation", "resize_mode", "quick_gelu")
    preprocess = {k: cfg[k] for k in keys if k in cfg}
    checkpoint = _cached_or_downloaded(cfg, model, pretrained)
    return checkpoint, preprocess, pretrained


def _cached_or_downloaded(cfg: dict[str, Any], model: str, pretrained: str) -> str:
    if cfg.get("hf_hub"):
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        # open_clip writes "org/repo/" (default file name) or "org/repo/file.bin"
        repo_id, filename = os.path.split(cfg["hf_hub"])
        names = _hf_candidate_files(filename or None)
        for name in names:
            try:
                return hf_hub_download(repo_id, name, local_files_only=True)
            except (LocalEntryNotFoundError, FileNotFoundError, OSError):
                continue
        if not _host_reachable(constants.ENDPOINT):
            raise WeightsUnavailableError(_offline_hint(model, pretrained))
        last: Exception | None = None
        for name in names:
            try:
                return hf_hub_download(repo_id, name)
            except Exception as e:  # noqa: BLE001 - any hub failure means "try the next name"
                last = e
        raise WeightsUnavailableError(
            f"{_offline_hint(model, pretrained)} (download failed: {first_line(last)})"
        )
    if cfg.get("url"):
        from open_clip.pretrained import download_pretrained_from_url

        cache = Path(os.path.expanduser("~/.cache/clip"))
        cached = cache / os.path.basename(urlparse(cfg["url"]).path)
        if cached.is_file():
            return str(cached)
        if not _host_reachable(cfg["url"]):
            raise WeightsUnavailableError(_offline_hint(model, pretrained))
        try:
            return download_pretrained_from_url(cfg["url"])
        except Exception as e:  # noqa: BLE001
            raise WeightsUnavailableError(f"{_offline_hint(model, pretrained)} ({e})") from e
    raise WeightsUnavailableError(_offline_hint(model, pretrained))


def _hf_candidate_files(filename: str | None) -> list[str]:
    # open_clip prefers a safetensors twin of a .bin/.pth file when the repo has one.
    filename = filename or "open_clip_pytorch_model.bin"
    names = []
    if filename == "open_clip_pytorch_model.bin":
        names.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    names.append(filename)
    return names


def weights_file(path: str | os.PathLike[str], name: str, missing: str) -> Path:
    """The weights of a checkpoint `path`: the folder's `name`, the .safetensors itself, or
    the one beside a .json; ValueError('PATH: `missing`') when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    elif path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise ValueError(f"{path}: {missing}")
    return path
