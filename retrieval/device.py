"""One reading of `--device` for every model in vqret: auto | cpu | cuda | cuda:N | mps.

The embedder, the tokenizer, the DiT and the FAISS index all take their device from here, so
a name that works for one works for all and a bad one fails the same way, in one line.
"auto" is the first CUDA device when torch sees one, else the CPU; mps (Apple GPUs) is used
only when asked for, since not every op the models use runs there.

Torch-free at import: the index (on the path of a cold `vqret search`) asks `cuda_number`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(ValueError):
    """A device name vqret doesn't know, or a device this machine doesn't have."""


def check_device_name(name: str) -> str:
    """`name` when it is one of auto | cpu | cuda | cuda:N | mps; DeviceError otherwise.

    Syntax only: whether the device is there is `resolve_device`'s question (a Ray driver
    checks the name, its workers have the GPUs)."""
    if not isinstance(name, str) or not (name in ("auto", "cpu", "mps") or _CUDA.fullmatch(name)):
        raise DeviceError(f"unknown device {name!r}: use {DEVICE_NAMES}")
    return name


def cuda_number(name: str) -> int | None:
    """The CUDA device number `name` asks for (auto and cuda: 0), None for cpu and mps."""
    match = _CUDA.fullmatch(check_device_name(name))
    if name == "auto":
        return 0
    return int(match.group(1) or 0) if match else None


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device `name` means on this machine; DeviceError when it isn't here."""
    import torch

    if isinstance(name, torch.device):
        return name
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("--device mps: torch sees no MPS (Apple GPU) device")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: torch sees no CUDA device")
    number, count = cuda_number(name), torch.cuda.device_count()
    if number >= count:
        raise DeviceError(
            f"--device {name}: torch sees {count} CUDA device{'s' if count > 1 else ''} "
            f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})"
        )
    return torch.device(name)
