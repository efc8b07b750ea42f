"""The architecture's layers, as CI checks them: `lint-imports` with pyproject's contracts.

It passes on the code as it is, and fails, naming the contract, as soon as a forbidden import
is added to a copy of the package (so the check is live, not a rule nobody runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TESTS

REPO = TESTS.parent
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint(package_parent: Path, config: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the copy is the `vqret` that gets analysed, not the installed one
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([LINT, "--config", str(config), "--no-cache"], capture_output=True,
                          text=True, env=env, cwd=package_parent, timeout=300)


def copy_package(tmp_path: Path) -> Path:
    """The package's Python files and pyproject.toml under tmp_path/vqret."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        here = Path(folder)
        return [n for n in names if n in (".git", "tests", "__pycache__", "node_modules")
                or n.startswith(".")
                or ((here / n).is_file() and not n.endswith((".py", ".toml")))]

    target = tmp_path / "vqret"
    shutil.copytree(REPO, target, ignore=ignore)
    return target


def test_the_code_keeps_its_layers(tmp_path):
    # a copy, so that the checkout's folder may have any name (the package is `vqret`)
    proc = lint(tmp_path, copy_package(tmp_path) / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "forbidden", "contract"),
    [
        ("retrieval/urls.py", "vqret.diffusion.paths", "Layers"),
        ("retrieval/query.py", "vqret.server.inputs", "Layers"),
        ("retrieval/engine.py", "vqret.api", "Layers"),
        ("tokenizer/model.py", "vqret.diffusion.model", "Layers"),
        ("diffusion/model.py", "vqret.cli.errors", "Layers"),
        ("cli/search.py", "vqret.retrieval.index", "go through the query engine"),
        ("server/service.py", "vqret.retrieval.onnx_text", "go through the query engine"),
    ],
)
def test_a_forbidden_import_breaks_the_build(tmp_path, module, forbidden, contract):
    package = copy_package(tmp_path)
    with open(package / module, "a") as f:
        f.write(f"\nimport {forbidden}  # noqa: E402, F401\n")
    broken = lint(tmp_path, package / "pyproject.toml")
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and contract in broken.stdout
    assert forbidden in broken.stdout, broken.stdout
