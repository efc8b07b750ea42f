"""Embed images and texts with any open_clip model into L2-normalised float32 vectors.

Weights come from a pretrained tag (resolved through the Hugging Face cache, downloaded once
when the network allows) or a local checkpoint file. Offline with nothing cached, loading
fails at once with one message that says how to pass a local file, instead of
huggingface_hub's retry loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from .device import resolve_device
from .images import ImageLoadError, load_image

# Defined beside the store (no torch there); imported here for the names users know.
from .model_spec import ModelConfigError, ModelSpec, WeightsUnavailableError

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
# `--pretrained none` builds the architecture with random weights: for speed benchmarks only.
RANDOM_WEIGHTS = "none"

ImageInput = str | os.PathLike | Image.Image


# --------------------------------------------------------------------------------------------
# Model resolution
# --------------------------------------------------------------------------------------------


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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
            f"{_offline_hint(model, pretrained)} (download failed: {str(last).splitlines()[0]})"
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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")


def default_workers(device: torch.device) -> int:
    """Decode processes: on a GPU, enough to feed it; on a CPU, torch's threads already fill
    every core and a worker that takes one stalls the whole parallel op, while decoding (with
    JPEG draft mode) is ~3-5% of a ViT's work, so about one worker per 8 cores keeps up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if device.type != "cpu":
        return min(8, cores)
    return max(1, min(8, cores // 8))


def fast_precision(device: torch.device) -> str:
    """The reduced precision this device runs fast: fp16 on CUDA, bf16 on CPUs with native
    bf16 matmul (AVX512-BF16 / AMX), else fp32. Embeddings stay within cosine 0.999 of fp32."""
    if device.type == "cuda":
        return "fp16"
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return "bf16" if check is not None and check() else "fp32"
    except RuntimeError:
        return "fp32"


def _causal_text_tower(model: torch.nn.Module):
    """The module holding the text positions and causal mask, when prefix encoding is exact."""
    tower = model.text if hasattr(model, "text") else model
    pool = getattr(tower, "text_pool_type", "argmax")
    if getattr(tower, "attn_mask", None) is None or pool != "argmax":
        return None  # bidirectional or not pooled at EOT: every position matters
    if not isinstance(getattr(tower, "positional_embedding", None), torch.nn.Parameter):
        return None
    return tower


# --------------------------------------------------------------------------------------------
# Decoding in worker processes
# --------------------------------------------------------------------------------------------


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses one file per item; failures travel as data, not exceptions."""

    def __init__(self, paths: Sequence[str], transform: Callable, draft_size: int | None):
        self.paths = paths
        self.transform = transform
        self.draft = (draft_size, draft_size) if draft_size else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i], draft_size=self.draft)
            size = image.size
            return i, self.transform(image), size, None
        except ImageLoadError as e:
            return i, None, (0, 0), e.cause
        except Exception as e:  # noqa: BLE001 - a decoder bug must not end the whole run
            return i, None, (0, 0), f"{type(e).__name__}: {e}".splitlines()[0]


def _collate(items):
    good = [it for it in items if it[1] is not None]
    pixels = torch.stack([it[1] for it in good]) if good else None
    return (
        [it[0] for it in good],
        pixels,
        [it[2] for it in good],
        [(it[0], it[3]) for it in items if it[1] is None],
    )


@dataclass
class ImageBatch:
    """One batch out of `Embedder.iter_image_files`: embeddings for the files that decoded."""

    indices: list[int]  # positions in the input list
    embeddings: np.ndarray  # (B, D) float32, L2-normalised
    sizes: list[tuple[int, int]]  # (width, height) of each decoded image
    failures: list[tuple[int, str]]  # (position, cause) of files that didn't decode
    # content hash of each decoded file, from an embedder that hashes what it reads
    # (`hashes_what_it_reads`, the Ray engine's): the Indexer then skips its own hash pass
    # on a first run
    hashes: list[str] | None = None


# --------------------------------------------------------------------------------------------
# The embedder
# --------------------------------------------------------------------------------------------


class Embedder:
    """An open_clip model ready to embed images and texts.

    >>> emb = Embedder("ViT-B-32", "laion2b_s34b_b79k")           # doctest: +SKIP
    >>> emb.embed_texts(["a red car"]).shape                        # doctest: +SKIP
    (1, 512)
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pretrained: str = DEFAULT_PRETRAINED,
        *,
        device: str = "auto",
        batch_size: int = 64,
        num_workers: int | None = None,
        precision: str = "fp32",
        draft_decode: bool = True,
        model_config: dict[str, Any] | None = None,
    ):
        import open_clip

        self.name = register_model_config(model, model_config)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        self.num_workers = default_workers(self.device) if num_workers is None else num_workers
        check_precision(precision)
        self.precision = fast_precision(self.device) if precision == "auto" else precision
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision fp16 runs on CUDA only: use bf16 (or auto) on a CPU")
        self.draft_decode = draft_decode

        checkpoint, preprocess_overrides, weights_id = resolve_weights(self.name, pretrained)
        if checkpoint is None:
            # Random weights are for benchmarks; seeding makes them the same in every process.
            torch.manual_seed(0)
        try:
            model_obj, _, preprocess = open_clip.create_model_and_transforms(
                self.name,
                pretrained=checkpoint,
                device=self.device,
                force_quick_gelu=bool(preprocess_overrides.get("quick_gelu", False)),
                image_mean=preprocess_overrides.get("mean"),
                image_std=preprocess_overrides.get("std"),
                image_interpolation=preprocess_overrides.get("interpolation"),
                image_resize_mode=preprocess_overrides.get("resize_mode"),
            )
        except RuntimeError as e:
            # A checkpoint that doesn't fit the architecture: say which, in one line.
            first = str(e).strip().splitlines()[0]
            raise WeightsUnavailableError(
                f"weights {pretrained!r} don't fit model {self.name!r}: {first}"
            ) from e
        model_obj.eval()
        if self.precision != "fp32" and self.device.type == "cpu":
            # bf16 weights rather than autocast on CPU: autocast re-casts every weight on
            # every call, which cost more than the bf16 matmuls saved (ViT-B-32, batch 32:
            # fp32 6.2 img/s, autocast 5.8, bf16 weights 13.2 on the same 2 cores), and the
            # embeddings stay within cosine 0.9999 of fp32. oneDNN's bf16 convolution (the
            # patch embedding) wants NHWC.
            model_obj = model_obj.to(torch.bfloat16).to(memory_format=torch.channels_last)
        self.model = model_obj
        self._text_lock = threading.Lock()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(self.name)
        visual = model_obj.visual
        image_size = getattr(visual, "image_size", 224)
        self.image_size = int(image_size[0] if isinstance(image_size, tuple | list) else image_size)
        config = model_config_json(self.name)
        self.embed_dim = int(config["embed_dim"])
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        self.spec = ModelSpec(
            model=self.name,
            pretrained=checkpoint if checkpoint and weights_id.startswith("sha256:") else (
                weights_id
            ),
            weights_id=weights_id,
            embed_dim=self.embed_dim,
            preprocess={k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()},
            model_config=config,
        )

    @classmethod
    def from_spec(cls, spec: ModelSpec, **kwargs: Any) -> Embedder:
        """Rebuild the embedder a store was made with."""
        return cls(spec.model, spec.pretrained, model_config=spec.model_config, **kwargs)

    # ---- precision ------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32" or self.device.type == "cpu":
            # fp32, or bf16 on CPU where the weights themselves are bf16 (see __init__)
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _normalise(self, features: torch.Tensor) -> np.ndarray:
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)

    # ---- texts ----------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 L2-normalised text embeddings."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            with self._autocast():
                out.append(self._normalise(self.encode_tokens(tokens)))
        if not out:
            return np.zeros((0, getattr(self, "embed_dim", 0)), dtype=np.float32)
        return np.concatenate(out)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """encode_text over the shortest prefix that holds every end token.

        The text tower is causal and pools at the end-of-text token, so positions after it
        change nothing: a 3-word query costs ~8 positions instead of 77.
        """
        tower = _causal_text_tower(self.model)
        if tower is None:
            return self.model.encode_text(tokens)
        length = int(tokens.argmax(dim=1).max()) + 1  # EOT has the highest token id
        if length >= tokens.shape[1]:
            return self.model.encode_text(tokens)
        full_pos, full_mask = tower.positional_embedding, tower.attn_mask
        with self._text_lock:  # the tower is shortened in place for this call only
            try:
                tower.positional_embedding = torch.nn.Parameter(
                    full_pos[:length], requires_grad=False
                )
                tower.attn_mask = full_mask[:length, :length]
                return self.model.encode_text(tokens[:, :length])
            finally:
                tower.positional_embedding, tower.attn_mask = full_pos, full_mask

    # ---- images ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed pixels -> (B, D) normalised embeddings."""
        pixels = pixels.to(self.device, non_blocking=True)
        if self.precision != "fp32" and self.device.type == "cpu":
            pixels = pixels.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self._normalise(self.model.encode_image(pixels))

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N, D) float32 L2-normalised image embeddings, in input order.

        Paths are decoded in worker processes; a file that fails raises ImageLoadError.
        """
        if isinstance(images, str | os.PathLike | Image.Image):
            images = [images]
        if all(isinstance(im, Image.Image) for im in images):
            out = []
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in chunk])
                out.append(self.encode_pixels(pixels))
            return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)
        paths = [str(p) for p in images if not isinstance(p, Image.Image)]
        if len(paths) != len(images):
            return np.concatenate([self.embed_images([im]) for im in images])
        result = np.zeros((len(paths), self.embed_dim), dtype=np.float32)
        for batch in self.iter_image_files(paths):
            if batch.failures:
                i, cause = batch.failures[0]
                raise ImageLoadError(paths[i], cause)
            result[batch.indices] = batch.embeddings
        return result

    def iter_image_files(
        self, paths: Sequence[str], num_workers: int | None = None
    ) -> Iterator[ImageBatch]:
        """Stream batches of embeddings; files that fail to decode are reported, not raised.

        Decoding and preprocessing run in `num_workers` processes while the model runs.
        """
        workers = self.num_workers if num_workers is None else num_workers
        workers = min(workers, max(1, len(paths) // self.batch_size)) if len(paths) else 0
        draft = self.image_size if self.draft_decode else None
        loader = torch.utils.data.DataLoader(
            _ImageFiles(list(paths), self.preprocess, draft),
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )
        for indices, pixels, sizes, failures in loader:
            embeddings = (
                self.encode_pixels(pixels)
                if pixels is not None
                else np.zeros((0, self.embed_dim), np.float32)
            )
            yield ImageBatch(indices, embeddings, sizes, failures)
