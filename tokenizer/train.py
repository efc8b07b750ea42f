"""Train a VQ-VAE tokenizer on a folder (or list) of images, resumably.

    from vqret.tokenizer import train
    result = train("photos/", "runs/tok", preset="cpu", minutes=25)

The run's budget (`steps` and/or `minutes`) is the total for the run, resumes included: a
killed run started again with the same arguments continues from its last checkpoint, with
the same held-out split and the same learning-rate schedule, and stops where the first
would have. The learning rate warms up linearly, then follows a cosine to a tenth of its
peak over the budget (by steps, or by training time with `minutes`).

Loss: pixel MSE on [-1, 1] images plus the quantizer's commitment loss (VQ-VAE eq. 3 with
the codebook term replaced by EMA updates). Augmentation: random crops and horizontal flips.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from vqret.retrieval.atomic import atomic_write
from vqret.retrieval.device import resolve_device

from .checkpoint import TRAIN_STATE_FILE, save_checkpoint
from .config import TokenizerConfig, get_config
from .data import (
    MIN_CROP_SCALE,
    TrainImages,
    decode_images,
    list_images,
    split_holdout,
    to_unit,
)
from .evaluate import evaluate
from .model import VQVAE

__all__ = ["TrainResult", "train"]

log = logging.getLogger(__name__)
Log = Callable[[str], Any]

WARMUP_STEPS = 100
MIN_LR_RATIO = 0.1
# Keep decoded training images in memory up to this size (~140k images at the gpu preset).
CACHE_LIMIT_BYTES = 8 * 2**30


@dataclass
class TrainResult:
    out: Path  # checkpoint folder
    step: int  # optimizer steps done in total (resumes included)
    train_seconds: float  # training time in total (resumes included)
    images_seen: int
    resumed_from: int  # step the run resumed at, 0 for a fresh run
    train_images: int
    held_out_images: int
    metrics: dict[str, Any] = field(default_factory=dict)  # held-out evaluation at the end

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["out"] = str(self.out)
        return d


def check_budget(steps: int | None, minutes: float | None, batch_size: int, lr: float) -> None:
    """A training run's budget and step size, checked before anything loads."""
    if steps is None and minutes is None:
        raise ValueError("give a budget: steps and/or minutes")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def train(
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    preset: str | os.PathLike[str] | TokenizerConfig = "cpu",
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    holdout: float = 0.05,
    max_holdout: int = 256,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    workers: int = 0,
    cache: bool | None = None,
    eval_every: int | None = None,
    save_every_s: float = 300.0,
    resume: bool = True,
    progress: bool = False,
    log_fn: Log | None = None,
    root: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train (or continue training) a tokenizer; checkpoints go to the folder `out`.

    images: a folder (walked like `vqret index`) or a list of image paths.
    preset: a preset name (`list_presets()`), a config JSON or a TokenizerConfig;
        `overrides` change single config fields (e.g. codebook_size=512).
    steps / minutes: the run's total budget; at least one; the first reached ends it.
    holdout: fraction of files (chosen by a hash of their names) kept out of training and
        measured; at most `max_holdout` of them are used.
    precision: "auto" (bf16 autocast where the CPU or GPU has bf16 units), "bf16" or "fp32".
    threads: torch CPU threads (default: torch's choice).
    workers: DataLoader worker processes for augmentation (0: in the training process).
    cache: decode every training file once and keep it in memory, or decode per sample
        (use workers then); default: cache when that takes less than CACHE_LIMIT_BYTES.
    eval_every: steps between held-out evaluations (default: about once a minute).
    resume: continue from `out`'s last checkpoint when there is one (else start over).
    progress: show a rich progress bar on stderr; `log_fn` gets one line per evaluation.
    root: with a list of paths, the folder the held-out split takes them relative to (so
        the split survives the folder moving); a folder `images` is its own root.
    """
    say = log_fn or log.info
    check_budget(steps, minutes, batch_size, lr)
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    config = get_config(preset, **overrides)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(
            images,
            Path(out),
            config,
            steps=steps,
            minutes=minutes,
            batch_size=batch_size,
            lr=lr,
            holdout=holdout,
            max_holdout=max_holdout,
            seed=seed,
            device=device,
            precision=precision,
            workers=workers,
            cache=cache,
            eval_every=eval_every,
            save_every_s=save_every_s,
            resume=resume,
            progress=progress,
            say=say,
            root=root,
        )
    finally:
        torch.set_num_threads(previous_threads)  # the thread count is process-wide


def _train(
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: Path,
    config: TokenizerConfig,
    *,
    steps: int | None,
    minutes: float | None,
    batch_size: int,
    lr: float,
    holdout: float,
    max_holdout: int,
    seed: int,
    device: str,
    precision: str,
    workers: int,
    cache: bool | None,
    eval_every: int | None,
    save_every_s: float,
    resume: bool,
    progress: bool,
    say: Log,
    root: str | os.PathLike[str] | None = None,
) -> TrainResult:
    dev = resolve_device(device)
    use_bf16 = _use_bf16(dev, precision)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels

    # ---- model, optimizer, and the state to resume from ----
    torch.manual_seed(seed)
    model = VQVAE(config).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    state = _load_train_state(out, config) if resume else None
    step, train_seconds, images_seen = 0, 0.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, train_seconds = int(state["step"]), float(state["train_seconds"])
        images_seen = int(state["images_seen"])
    resumed_from = step

    # ---- data ----
    paths = list_images(images)
    is_folder = isinstance(images, (str, os.PathLike))
    root = images if is_folder else root
    # a folder names itself; a list (e.g. a store's rows) is summed up, not copied into JSON
    source = str(images) if is_folder else f"{len(paths)} listed files"
    train_paths, held_paths = split_holdout(paths, holdout, root=root, max_holdout=max_holdout)
    if not train_paths:
        raise ValueError(f"no training images in {source}")
    started = time.perf_counter()
    if cache is None:
        # Cached images are kept at a short side of image_size / MIN_CROP_SCALE, 4:3 on average.
        side = config.image_size / MIN_CROP_SCALE
        cache = len(train_paths) * side * side * 4 / 3 * 3 <= CACHE_LIMIT_BYTES
        if not cache:
            say(
                f"{len(train_paths)} images are too many to keep decoded in memory: decoding "
                "every sample instead (give workers > 0 to do it in parallel)"
            )
    dataset = TrainImages(train_paths, config.image_size, cache=cache, on_error=say)
    held_out, _ = decode_images(held_paths, config.image_size, on_error=say)
    say(
        f"{len(dataset)} training and {held_out.shape[0]} held-out images from {source} "
        f"({time.perf_counter() - started:.1f} s to decode); preset {config.name}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{config.grid_size}x{config.grid_size} grid of {config.num_codes} codes, "
        f"{dev}, {'bf16' if use_bf16 else 'fp32'}, {torch.get_num_threads()} threads"
        + (f"; resuming at step {step}" if step else "")
    )
    batches = _batches(dataset, batch_size, workers, seed + step)

    # ---- schedule: by steps, by time, or whichever ends first ----
    def fraction_done() -> float:
        by_steps = step / steps if steps else 0.0
        by_time = train_seconds / (minutes * 60) if minutes else 0.0
        return max(by_steps, by_time)

    # Short runs (tests) would spend their whole budget warming up: cap it at a tenth.
    warmup = min(WARMUP_STEPS, max(1, steps // 10)) if steps else WARMUP_STEPS

    def lr_now() -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        cosine = 0.5 * (1 + math.cos(math.pi * min(fraction_done(), 1.0)))
        return lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * cosine)

    def save(metrics: dict[str, Any] | None = None) -> None:
        # Train state first: it has its own copy of the weights, so a kill between the two
        # writes still resumes consistently.
        _save_train_state(out, model, optimizer, step, train_seconds, images_seen)
        info = {
            "step": step,
            "train_seconds": round(train_seconds, 1),
            "images_seen": images_seen,
            "data": {"source": source, "train": len(dataset), "held_out": held_out.shape[0]},
            "training": {
                "batch_size": batch_size,
                "lr": lr,
                "precision": "bf16" if use_bf16 else "fp32",
                "seed": seed,
            },
        }
        if metrics:
            info["metrics"] = metrics
        save_checkpoint(model, out, info)

    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    window = _Window(model.num_codes)
    metrics: dict[str, Any] = {}
    last_eval_time = last_save_time = time.perf_counter()
    bar = _ProgressBar(steps, minutes) if progress else None
    model.train()
    try:
        with bar or nullcontext():
            while fraction_done() < 1.0:
                t0 = time.perf_counter()
                batch = to_unit(next(batches).to(dev, non_blocking=True))
                for group in optimizer.param_groups:
                    group["lr"] = lr_now()
                with autocast():
                    recon, indices, aux = model(batch)
                recon_loss = F.mse_loss(recon.float(), batch)
                loss = recon_loss + aux["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                images_seen += batch.shape[0]
                train_seconds += time.perf_counter() - t0
                window.add(recon_loss, aux, indices)

                now = time.perf_counter()
                due = (step % eval_every == 0) if eval_every else now - last_eval_time >= 60
                finished = fraction_done() >= 1.0
                if (due or finished) and held_out.shape[0]:
                    metrics = evaluate(model, held_out, batch_size=batch_size)
                    last_eval_time = time.perf_counter()
                    say(_eval_line(step, train_seconds, lr_now(), window, metrics))
                if bar is not None:
                    bar.update(step, train_seconds, window, metrics)
                if now - last_save_time >= save_every_s:
                    save(metrics)
                    last_save_time = time.perf_counter()
                window.roll(due)
    except KeyboardInterrupt:
        save(metrics)
        say(f"interrupted at step {step}: saved to {out}; run again to resume")
        raise
    if state is None or step != resumed_from or not _model_saved_at(out, step):
        save(metrics)  # (a run that failed between the train state and the model: the model)
    elif not metrics and held_out.shape[0]:
        metrics = evaluate(model, held_out, batch_size=batch_size)
    return TrainResult(
        out=out,
        step=step,
        train_seconds=train_seconds,
        images_seen=images_seen,
        resumed_from=resumed_from,
        train_images=len(dataset),
        held_out_images=int(held_out.shape[0]),
        metrics=metrics,
    )


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def _use_bf16(device: torch.device, precision: str) -> bool:
    if precision == "fp32":
        return False
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "mps":
        supported = False  # autocast there is fp16-first and untested here: fp32
    else:
        # oneDNN runs bf16 convolutions natively with AVX512-BF16 or AMX (about 2x fp32
        # here); elsewhere it emulates them, slower than fp32.
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "bf16" and not supported:
        raise ValueError(f"precision bf16 asked for, but this {device.type} has no bf16 units")
    return supported


def _batches(dataset: TrainImages, batch_size: int, workers: int, seed: int):
    """Endless shuffled batches (uint8 (B, 3, S, S)); a new permutation every epoch."""
    random.seed(seed)  # crops and flips in TrainImages use `random`
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=generator,
        worker_init_fn=_seed_worker,
    )
    while True:
        yield from loader


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _load_train_state(out: Path, config: TokenizerConfig) -> dict[str, Any] | None:
    path = out / TRAIN_STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = TokenizerConfig.from_dict(state["config"])
    if saved != config:
        raise ValueError(
            f"{out} holds a run of another config ({saved.name}): resume it with the same "
            "preset and options, or start over in another folder (or with resume off / --fresh)"
        )
    return state


def _model_saved_at(out: Path, step: int) -> bool:
    """Whether the checkpoint beside the train state is of `step` (and readable)."""
    from .checkpoint import read_checkpoint_info

    try:
        return read_checkpoint_info(out).get("step") == step
    except (OSError, ValueError, KeyError):
        return False


def _save_train_state(out: Path, model, optimizer, step, train_seconds, images_seen) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "train_seconds": train_seconds,
        "images_seen": images_seen,
    }
    atomic_write(out / TRAIN_STATE_FILE, lambda tmp: torch.save(state, tmp))


class _Window:
    """Training statistics since the last evaluation: loss, PSNR and codes hit."""

    def __init__(self, num_codes: int) -> None:
        self.num_codes = num_codes
        self.counts = torch.zeros(num_codes, dtype=torch.long)
        self.loss = self.commit = 0.0
        self.n = 0

    def add(self, recon_loss: torch.Tensor, aux: dict, indices: torch.Tensor) -> None:
        self.loss += float(recon_loss.detach())
        self.commit += float(aux["commitment_loss"])
        self.n += 1
        self.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=self.num_codes)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.n, 1)

    @property
    def psnr(self) -> float:
        # MSE on [-1, 1] images: a peak-to-peak range of 2, so PSNR = 10 log10(4 / mse).
        return 10 * math.log10(4 / max(self.mean_loss, 1e-10))

    @property
    def usage(self) -> float:
        return float((self.counts > 0).float().mean())

    def roll(self, reset: bool) -> None:
        if reset:
            self.__init__(self.num_codes)


def _eval_line(step: int, seconds: float, lr: float, window: _Window, m: dict) -> str:
    return (
        f"step {step} ({seconds / 60:.1f} min) lr {lr:.2e} | train mse {window.mean_loss:.4f} "
        f"psnr {window.psnr:.2f} usage {window.usage:.1%} | held-out psnr {m['psnr']:.2f} "
        f"ssim {m['ssim']:.3f} usage {m['codebook_usage']:.1%} perplexity {m['perplexity']:.0f}"
    )


class _ProgressBar:
    """rich progress on stderr: steps (or minutes) done, loss, PSNR and codebook usage."""

    def __init__(self, steps: int | None, minutes: float | None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.steps, self.minutes = steps, minutes
        self.progress = Progress(
            TextColumn("training"),
            BarColumn(),
            TextColumn("step {task.fields[step]}"),
            TextColumn(
                "loss {task.fields[loss]}  psnr {task.fields[psnr]} dB (held-out "
                "{task.fields[held]})  usage {task.fields[usage]}"
            ),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task(
            "train", total=1.0, step=0, loss="-", psnr="-", held="-", usage="-"
        )

    def __enter__(self) -> _ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, seconds: float, window: _Window, metrics: dict) -> None:
        done = max(
            step / self.steps if self.steps else 0.0,
            seconds / (self.minutes * 60) if self.minutes else 0.0,
        )
        self.progress.update(
            self.task,
            completed=min(done, 1.0),
            step=step,
            loss=f"{window.mean_loss:.4f}",
            psnr=f"{window.psnr:.2f}",
            held=f"{metrics['psnr']:.2f}" if metrics else "-",
            usage=f"{window.usage:.0%}",
        )
