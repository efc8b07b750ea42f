"""Training the DiT on a store: CLIP image embeddings -> tokenizer latents, resumable.

    from vqret.diffusion.train import train
    train("photos/.vqret", preset="cpu", minutes=30)     # checkpoint in photos/.vqret/diffusion

The budget (`steps` and/or `minutes`) counts over all resumes: run the same call again after
a kill and it continues from the last checkpoint until the budget is spent. Each step's
randomness (batch, flips, times, noise, null drops) is seeded by (seed, step), so a resumed
run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vqret.retrieval.atomic import atomic_write
from vqret.retrieval.device import resolve_device
from vqret.retrieval.store import Store
from vqret.tokenizer.api import Tokenizer
from vqret.tokenizer.store_codes import store_tokenizer_path
from vqret.tokenizer.train import check_budget

from .checkpoint import TRAIN_STATE_FILE, WEIGHTS_FILE, CheckpointInfo, save_checkpoint
from .config import DiffusionConfig, get_config
from .flow import flow_matching_loss
from .latents import load_training_pairs
from .model import DiT
from .paths import DIFFUSION_DIRNAME

__all__ = ["TrainResult", "train"]

log = logging.getLogger(__name__)
Log = Callable[[str], None]
WARMUP_STEPS = 100


@dataclass
class TrainResult:
    out: Path
    step: int
    train_seconds: float
    loss: float | None  # mean loss over the last steps of this run
    images: int
    latent_scale: float
    resumed_from: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "step": self.step, "train_seconds": round(self.train_seconds, 2),
            "loss": self.loss, "images": self.images, "latent_scale": self.latent_scale,
            "resumed_from": self.resumed_from,
        }


def train(
    store: str | os.PathLike[str] | Store | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    preset: str | DiffusionConfig | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int = 64,
    lr: float = 3e-4,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    save_every_s: float = 120.0,
    resume: bool = True,
    progress: bool = False,
    log_fn: Log | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train (or continue training) a DiT on `store`'s images; checkpoints go to `out`
    (default STORE/diffusion).

    tokenizer: checkpoint whose latents are diffused (default: STORE/tokenizer).
    preset: tiny | cpu | gpu-s | gpu-b, or a DiffusionConfig; `overrides` change fields.
        Default: the checkpoint's own config when resuming, else cpu.
    steps / minutes: total budget over all resumes; at least one.
    """
    say = log_fn or log.info
    check_budget(steps, minutes, batch_size, lr)
    store = store if isinstance(store, Store) else Store.open(store)
    get_config(preset or "cpu", **overrides)  # a bad preset or field fails before any work
    out = Path(out) if out is not None else store.path / DIFFUSION_DIRNAME
    dev = resolve_device(device)
    tok = Tokenizer.load(store_tokenizer_path(store, tokenizer), device=dev)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(store, out, tok, preset, overrides, steps, minutes, batch_size, lr, seed,
                      dev, save_every_s, resume, progress, say)
    finally:
        torch.set_num_threads(previous_threads)  # process-wide


def _train(store, out, tok, preset, overrides, steps, minutes, batch_size, lr, seed, dev,
           save_every_s, resume, progress, say) -> TrainResult:
    pairs = load_training_pairs(store, tok, log=say)
    spec = store.spec
    clip = {"model": spec.model, "weights_id": spec.weights_id, "embed_dim": spec.embed_dim}
    state = _load_train_state(out) if resume else None
    saved = CheckpointInfo.from_dict(state["info"], out / TRAIN_STATE_FILE) if state else None
    if saved is not None and preset is None and not overrides:
        preset = saved.config  # resuming without naming a preset: the checkpoint's own
    config = get_config(preset or "cpu", latent_channels=int(pairs.latents.shape[1]),
                        latent_size=int(pairs.latents.shape[2]), cond_dim=store.dim, **overrides)
    if saved is not None:
        info = saved
        _check_resumable(info, config, tok.id, clip, out)
        config = info.config
    else:
        # scale_by_std: one global factor so the diffused latents have unit variance
        info = CheckpointInfo(config=config, latent_scale=float(1.0 / pairs.latents.std()),
                              tokenizer_id=tok.id, clip=clip,
                              tokenizer_path=str(tok.path.parent) if tok.path else None)
    torch.manual_seed(seed)  # the same initial weights for the same seed
    model = DiT(config).to(dev)
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        say(f"resuming {out} at step {info.step} ({info.train_seconds / 60:.1f} min trained)")
    for p in ema.parameters():
        p.requires_grad_(False)
    resumed_from = info.step

    scale = info.latent_scale
    latents = torch.from_numpy(pairs.latents * scale)
    flipped = torch.from_numpy(pairs.flipped * scale)
    embeddings = torch.from_numpy(pairs.embeddings)
    n = len(pairs)
    say(f"{n} images, latents {tuple(latents.shape[1:])} x {scale:.3f}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config.name}")

    def budget_left() -> bool:
        if steps is not None and info.step >= steps:
            return False
        return minutes is None or info.train_seconds < minutes * 60

    def save() -> None:
        # Train state first: resuming reads only it (it holds the EMA weights too), so a
        # write that fails between the two (a full disk, a kill) still resumes, and that
        # run's closing save() writes the model again.
        out.mkdir(parents=True, exist_ok=True)
        train_state = {"info": info.to_dict(), "model": model.state_dict(),
                       "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
        atomic_write(out / TRAIN_STATE_FILE, lambda tmp: torch.save(train_state, tmp))
        save_checkpoint(ema, info, out)

    model.train()
    losses: list[float] = []
    last_save = time.monotonic()
    bar = _ProgressBar(steps, minutes, info) if progress else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    try:
        while budget_left():
            started = time.perf_counter()
            # all of this step's randomness from (seed, step): resuming draws the same
            torch.manual_seed(seed * 1_000_003 + info.step)
            pick = torch.randint(n, (batch_size,))
            flip = torch.rand(batch_size) < 0.5
            x0 = torch.where(flip[:, None, None, None], flipped[pick], latents[pick]).to(dev)
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (info.step + 1) / WARMUP_STEPS)
            with autocast:
                loss = flow_matching_loss(model, x0, embeddings[pick].to(dev))
            if not torch.isfinite(loss):
                raise ValueError(f"loss became {loss.item()} at step {info.step}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            _update_ema(ema, model, config.ema_decay, info.step)
            info.step += 1
            info.train_seconds += time.perf_counter() - started
            losses.append(loss.item())
            if bar is not None:
                bar.update(info, float(np.mean(losses[-50:])))
            if time.monotonic() - last_save > save_every_s:
                save()
                last_save = time.monotonic()
    finally:
        if bar is not None:
            bar.close()
    mean_loss = float(np.mean(losses[-100:])) if losses else None
    info.extra.update(images=n, loss=mean_loss if mean_loss is not None
                      else info.extra.get("loss"))
    save()
    return TrainResult(out, info.step, info.train_seconds, mean_loss, n, scale, resumed_from)


@torch.no_grad()
def _update_ema(ema: DiT, model: DiT, decay: float, step: int) -> None:
    # warm-up of the decay (as in TensorFlow's ExponentialMovingAverage with num_updates):
    # early weights are forgotten fast instead of dragging on the average for 1/(1-decay) steps
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - d)


def _check_resumable(info: CheckpointInfo, config: DiffusionConfig, tok_id: str,
                     clip: dict, out: Path) -> None:
    why = None
    if info.tokenizer_id != tok_id:
        why = f"it was trained on latents of tokenizer {info.tokenizer_id[:12]}, not {tok_id[:12]}"
    elif info.clip.get("weights_id") != clip["weights_id"]:
        why = f"it was trained on embeddings of {info.clip.get('model')}, not {clip['model']}"
    elif info.config != config:
        why = f"its config is {info.config.name!r} with other sizes than {config.name!r}"
    if why:
        raise ValueError(f"{out}: can't resume: {why}; pass --fresh (fresh=True) to start over "
                         "or another --out")


def _load_train_state(out: Path) -> dict[str, Any] | None:
    path = out / TRAIN_STATE_FILE
    if not path.is_file():
        if (out / WEIGHTS_FILE).is_file():
            raise ValueError(f"{out}: a model without {TRAIN_STATE_FILE} can't be resumed; pass "
                             "--fresh to start over or another --out")
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise ValueError(f"{path}: unreadable training state ({e}); pass --fresh") from e


class _ProgressBar:
    """A rich bar on stderr: steps (or minutes) done, loss, steps/s."""

    def __init__(self, steps: int | None, minutes: float | None, info: CheckpointInfo) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.by_steps = steps is not None
        total = steps if steps is not None else minutes * 60
        self.progress = Progress(
            TextColumn("training"), BarColumn(), TextColumn("step {task.fields[step]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, step=info.step, loss="-",
                                           rate="-")
        self.t0, self.step0 = time.perf_counter(), info.step

    def update(self, info: CheckpointInfo, loss: float) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = (info.step - self.step0) / elapsed if elapsed > 0 else math.nan
        done = info.step if self.by_steps else info.train_seconds
        self.progress.update(self.task, completed=done, step=info.step, loss=f"{loss:.4f}",
                             rate=f"{rate:.1f}")

    def close(self) -> None:
        self.progress.stop()
