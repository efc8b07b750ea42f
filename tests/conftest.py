"""Shared fixtures: the tiny CLIP trained on drawn shapes, and folders of drawn images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from fixtures.shapes import make_shape_folder  # noqa: E402

TINY_CLIP_CONFIG = TESTS / "fixtures" / "tiny_clip" / "tiny-clip.json"
TINY_CLIP_WEIGHTS = TESTS / "fixtures" / "tiny_clip" / "tiny-clip.safetensors"

# The tests never reach the network: a pretrained tag must come from the (empty) cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_clip() -> tuple[str, str]:
    """(model config path, weights path) of the fixture model: pass as --model/--pretrained."""
    assert TINY_CLIP_CONFIG.is_file() and TINY_CLIP_WEIGHTS.is_file(), (
        "fixture model missing: run python tests/fixtures/train_tiny_clip.py"
    )
    return str(TINY_CLIP_CONFIG), str(TINY_CLIP_WEIGHTS)


@pytest.fixture(scope="session")
def embedder(tiny_clip):
    from vqret.retrieval.embedder import Embedder

    return Embedder(*tiny_clip, device="cpu", batch_size=32, num_workers=0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models: a second thread only adds
    synchronisation (and on shared CI cores, spinning). The count is process-wide, so it is
    restored afterwards. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def shapes_folder(tmp_path) -> tuple[Path, list]:
    """120 drawn images (seed 1234, never seen in training) in tmp_path/images."""
    folder = tmp_path / "images"
    folder.mkdir()
    return folder, make_shape_folder(folder, 120, seed=1234)


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, env=None):
    """Run `vqret ...` in a fresh process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "vqret.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"vqret {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def run_json(*args: str, **kwargs):
    return json.loads(run_cli(*args, "--json", **kwargs).stdout)


# ---- the server tests' store (test_server*.py): 120 drawn shapes + one duplicate, served ------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, embedder):
    """(collection, drawn) for 120 drawn shapes + one duplicate, in a folder named `shapes`."""
    folder = tmp_path_factory.mktemp("served") / "shapes"
    from serve_helpers import index_shapes

    return index_shapes(folder, embedder)


@pytest.fixture(scope="module")
def app(shapes):
    collection, _ = shapes
    from vqret.server.app import create_app

    app = create_app([collection])
    yield app
    app.state.service.close()


@pytest.fixture(scope="module")
def client(app):
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        yield client
