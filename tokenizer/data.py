"""Images for the tokenizer: file lists, a stable held-out split, decoding, augmentation.

All decoding goes through `vqret.retrieval.images.load_image` (EXIF, alpha, 16-bit, pixel
cap), so the tokenizer sees exactly the pixels the retrieval side sees. Tensors are uint8
(N, 3, H, W) until the model's step converts them to [-1, 1] floats.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from vqret.retrieval.images import ImageLoadError, load_image
from vqret.retrieval.walk import walk_images

__all__ = [
    "ImageInput",
    "TrainImages",
    "center_square",
    "decode_images",
    "from_unit",
    "list_images",
    "split_holdout",
    "to_unit",
]

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike[str] | Image.Image | np.ndarray
# Random crops take this fraction of the short side at least: mild scale jitter that keeps
# the training statistics close to a whole image shrunk to image_size (as at evaluation).
MIN_CROP_SCALE = 0.8
# Panoramas are cropped to this aspect ratio at most before caching, so one odd file can't
# hold megabytes of pixels that no crop will ever reach.
MAX_ASPECT = 2.0


def list_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Image files under a folder (walk order: sorted, hidden and bookkeeping folders skipped),
    or a given list of paths as strings."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise ValueError(f"{root}: not a folder of images")
        return [str(root / e.relpath) for e in walk_images(root)]
    return [os.fspath(p) for p in source]


def split_holdout(
    paths: Sequence[str],
    fraction: float,
    *,
    root: str | os.PathLike[str] | None = None,
    max_holdout: int | None = None,
) -> tuple[list[str], list[str]]:
    """(train, held_out): a file is held out when a hash of its path falls under `fraction`.

    The path is taken relative to `root` when given, so the split depends on each file's
    place in the collection only, not on the list's order or length or where the folder is
    mounted: adding files or resuming a run never moves an image from one side to the other.
    (Not the bare file name: datasets name files image_0001.jpg in every class folder.)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    train, held_out = [], []
    for p in paths:
        key = os.path.relpath(p, root) if root is not None else p
        digest = hashlib.blake2b(key.replace(os.sep, "/").encode("utf-8", "surrogateescape"))
        u = int.from_bytes(digest.digest()[:8], "little") / 2**64
        (held_out if u < fraction else train).append(p)
    if fraction > 0 and not held_out and len(train) > 1:
        held_out.append(train.pop())  # tiny sets: still measure on something unseen
    if max_holdout is not None and len(held_out) > max_holdout:
        held_out = held_out[:max_holdout]  # the rest is neither trained on nor measured
    return train, held_out


# ------------------------------------------------------------------------------------------
# Pixels
# ------------------------------------------------------------------------------------------


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, H, W) in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, 3, H, W), rounded and clamped."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _as_pil(image: ImageInput, draft: int | None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"arrays must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image, "RGB")
    return load_image(image, draft_size=(draft, draft) if draft else None)


def _resize_short_side(img: Image.Image, side: int, max_aspect: float | None) -> Image.Image:
    w, h = img.size
    if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
        long_side = int(max_aspect * min(w, h))
        left, top = (w - min(w, long_side)) // 2, (h - min(h, long_side)) // 2
        img = img.crop((left, top, left + min(w, long_side), top + min(h, long_side)))
        w, h = img.size
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    # PIL's bicubic widens its kernel when shrinking, i.e. it antialiases.
    return img.resize(size, Image.Resampling.BICUBIC) if size != (w, h) else img


def center_square(image: ImageInput, size: int) -> np.ndarray:
    """The evaluation view of one image: short side resized to `size`, centre square crop.

    Returns uint8 (size, size, 3).
    """
    img = _resize_short_side(_as_pil(image, size), size, None)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_images(
    images: Sequence[ImageInput],
    size: int,
    *,
    on_error: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Centre views of `images` as uint8 (N, 3, size, size), and which inputs they came from.

    Files that fail to load are passed to `on_error` (or raise, without one).
    """
    arrays, kept = [], []
    for i, image in enumerate(images):
        try:
            arrays.append(center_square(image, size))
            kept.append(i)
        except ImageLoadError as err:
            if on_error is None:
                raise
            on_error(str(err))
    if not arrays:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8), kept
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return batch, kept


# ------------------------------------------------------------------------------------------
# Training images
# ------------------------------------------------------------------------------------------


class TrainImages(torch.utils.data.Dataset):
    """Random crops (MIN_CROP_SCALE..1 of the short side) and flips, as uint8 (3, S, S).

    Every file is decoded once, at a short side of size / MIN_CROP_SCALE so that crops are
    always downscaled, and kept in memory: a collection of 3,000 files costs ~80 MB at the
    64 px preset. With `cache=False` files are decoded again for every sample (collections
    too large for memory; run with DataLoader workers then).
    """

    def __init__(
        self,
        paths: Sequence[str],
        size: int,
        *,
        cache: bool = True,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.size = size
        self.base = int(np.ceil(size / MIN_CROP_SCALE))
        self.paths = list(paths)
        self.cache: list[Image.Image] | None = None
        if cache:
            self.cache, kept = [], []
            for p in self.paths:
                try:
                    self.cache.append(self._load(p))
                    kept.append(p)
                except ImageLoadError as err:
                    (on_error or log.warning)(str(err))
            self.paths = kept
        if not self.paths:
            raise ValueError("no loadable training images")

    def _load(self, path: str) -> Image.Image:
        img = load_image(path, draft_size=(self.base, self.base))
        img = _resize_short_side(img, self.base, MAX_ASPECT)
        img.load()
        return img

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            img = self.cache[i]
        else:
            # Uncached, a file that broke since the walk must not end the run: take another.
            for attempt in range(10):
                try:
                    img = self._load(self.paths[i])
                    break
                except ImageLoadError as err:
                    if attempt == 9:
                        raise
                    log.warning("%s", err)
                    i = random.randrange(len(self.paths))
        w, h = img.size
        side = random.uniform(MIN_CROP_SCALE, 1.0) * min(w, h)
        left = random.uniform(0, w - side)
        top = random.uniform(0, h - side)
        crop = img.resize(
            (self.size, self.size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
        )
        if random.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)
