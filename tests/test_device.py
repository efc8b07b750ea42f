"""One `--device` reading for every model: auto | cpu | cuda | cuda:N | mps."""

from __future__ import annotations

import pytest
import torch
from vqret.retrieval.device import DeviceError, check_device_name, cuda_number, resolve_device


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_cuda_when_torch_sees_one_else_the_cpu(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    _fake_cuda(monkeypatch, 1)
    assert resolve_device("auto") == torch.device("cuda")


def test_cpu_and_a_torch_device_pass_through():
    assert resolve_device("cpu") == torch.device("cpu")
    given = torch.device("cpu")
    assert resolve_device(given) is given


def test_cuda_n_is_accepted_and_checked_against_the_devices_there(monkeypatch):
    for name in ("cuda", "cuda:0", "cuda:1", "cuda:12", "mps", "auto", "cpu"):
        assert check_device_name(name) == name
    assert [cuda_number(n) for n in ("auto", "cuda", "cuda:1", "cpu", "mps")] == [0, 0, 1, None,
                                                                                 None]
    _fake_cuda(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"--device cuda:2: torch sees 2 CUDA devices"):
        resolve_device("cuda:2")
    _fake_cuda(monkeypatch, 0)
    # a well-formed name on a machine without it: "not here", not "unknown"
    with pytest.raises(DeviceError, match="--device cuda:1: torch sees no CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda1", "cpu:0", "", "tpu"])
def test_other_names_fail_with_one_message_that_lists_the_choices(name):
    with pytest.raises(DeviceError) as e:
        resolve_device(name)
    assert str(e.value) == f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps"
    assert isinstance(e.value, ValueError)  # the CLI's one-line errors catch ValueError


def test_every_model_takes_its_device_from_the_one_resolver(monkeypatch, tiny_clip):
    # the tokenizer and the embedder used to read `--device` each their own way
    from vqret.retrieval.embedder import Embedder
    from vqret.tokenizer.api import Tokenizer
    from vqret.tokenizer.model import create_model

    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        Tokenizer(create_model("tiny"), device="gpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        Embedder(*tiny_clip, device="gpu")
    _fake_cuda(monkeypatch, 0)
    with pytest.raises(DeviceError, match="--device cuda:1: torch sees no CUDA device"):
        Tokenizer(create_model("tiny"), device="cuda:1")
    with pytest.raises(DeviceError, match="--device cuda:1: torch sees no CUDA device"):
        Embedder(*tiny_clip, device="cuda:1")


def test_the_index_reads_the_same_names(monkeypatch):
    import faiss
    import numpy as np
    from vqret.retrieval import index as index_mod

    index = index_mod.build_index(np.arange(3), np.eye(3, dtype=np.float32))
    moved = []
    monkeypatch.setattr(index_mod, "gpu_count", lambda: 2)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: None, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda _, n, i: moved.append(n) or i,
                        raising=False)
    for name in ("cpu", "mps", "auto", "cuda", "cuda:1", "cuda:2"):
        assert index_mod.to_search_device(index, name) is index
    assert moved == [0, 0, 1]  # cuda:2 of two GPUs: stays on the CPU
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        index_mod.to_search_device(index, "gpu")
