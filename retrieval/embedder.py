"""Embed images and texts with any open_clip model into L2-normalised float32 vectors.

The batching: texts in batches on the model's device, image files decoded and preprocessed
in worker processes while the model runs, failures reported per file. Which weights to load
(tags, files, the Hugging Face cache, offline) is vqret.retrieval.weights'; the device,
vqret.retrieval.device's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# The names users know from here, defined in torch-free modules: the store reads ModelSpec,
# a cold `vqret search` resolves no weights and no device.
from .content_hash import file_sha256, unreadable
from .device import resolve_device
from .images import ImageLoadError, load_image
from .metadata import ImageFacts, read_facts
from .model_spec import ModelConfigError, ModelSpec, WeightsUnavailableError
from .one_line import first_line
from .urls import is_url
from .weights import (
    RANDOM_WEIGHTS,
    model_config_json,
    register_model_config,
    resolve_weights,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "RANDOM_WEIGHTS",
    "Embedder",
    "ImageBatch",
    "ModelConfigError",
    "ModelSpec",
    "WeightsUnavailableError",
    "check_precision",
    "fast_precision",
    "file_sha256",
    "model_config_json",
    "register_model_config",
    "resolve_device",
    "resolve_weights",
]

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

ImageInput = str | os.PathLike | Image.Image


# --------------------------------------------------------------------------------------------
# Precision and workers
# --------------------------------------------------------------------------------------------


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
    """Decodes and preprocesses one file per item; failures travel as data, not exceptions.

    A local file is read into memory once, and both its decode and its header facts (EXIF
    capture time, camera, displayed size...: metadata.py) parse those bytes, as the Ray
    actors do with theirs: the facts cost ~40 us a file, against ~500 us to decode a small
    JPEG (URLs are opened twice: by the decode, and for the header)."""

    def __init__(self, paths: Sequence[str], transform: Callable, draft_size: int | None):
        self.paths = paths
        self.transform = transform
        self.draft = (draft_size, draft_size) if draft_size else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        source = self.paths[i]
        if isinstance(source, str | os.PathLike) and not is_url(source):
            try:  # read once: the decode and the header facts both parse these bytes
                source = Path(source).read_bytes()
            except OSError as err:
                return i, None, (0, 0), unreadable(err), None
        try:
            image = load_image(source, draft_size=self.draft)
            size = image.size
            return i, self.transform(image), size, None, read_facts(source)
        except ImageLoadError as e:
            return i, None, (0, 0), e.cause, None
        except Exception as e:  # noqa: BLE001 - a decoder bug must not end the whole run
            return i, None, (0, 0), f"{type(e).__name__}: {e}".splitlines()[0], None


def _collate(items):
    good = [it for it in items if it[1] is not None]
    pixels = torch.stack([it[1] for it in good]) if good else None
    return (
        [it[0] for it in good],
        pixels,
        [it[2] for it in good],
        [(it[0], it[3]) for it in items if it[1] is None],
        [it[4] for it in good],
    )


@dataclass
class ImageBatch:
    """One batch out of `Embedder.iter_image_files`: embeddings for the files that decoded."""

    indices: list[int]  # positions in the input list
    embeddings: np.ndarray  # (B, D) float32, L2-normalised
    sizes: list[tuple[int, int]]  # (width, height) of each decoded image (a JPEG's draft)
    failures: list[tuple[int, str]]  # (position, cause) of files that didn't decode
    # content hash of each decoded file, from an embedder that hashes what it reads
    # (`hashes_what_it_reads`, the Ray engine's): the Indexer then skips its own hash pass
    # on a first run
    hashes: list[str] | None = None
    # each decoded file's header facts (metadata.py): the rows' metadata columns; None from an
    # embedder that doesn't read them (the Indexer then reads them itself)
    facts: list[ImageFacts] | None = None


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
            raise WeightsUnavailableError(
                f"weights {pretrained!r} don't fit model {self.name!r}: {first_line(e)}"
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
        for indices, pixels, sizes, failures, facts in loader:
            embeddings = (
                self.encode_pixels(pixels)
                if pixels is not None
                else np.zeros((0, self.embed_dim), np.float32)
            )
            yield ImageBatch(indices, embeddings, sizes, failures, facts=facts)
