"""The docs can't rot: their Python examples run, and no file names a path of one machine.

1. The ```python blocks of docs/getting-started.md, docs/python-api.md, README.md,
   docs/tokenizer.md and docs/diffusion.md run, each page's blocks in order in one namespace
   (as a reader types them into one session), in a temporary folder holding `photos/`: drawn
   shapes plus `photos/dog.jpg` (with a caption, `photos/dog.txt`) and `photos/cat.jpg`.
   The examples name the default model as a user would (ViT-B-32, laion2b_s34b_b79k), which
   can't be downloaded here, so the test swaps in the fixture model in exactly two ways:
   `vqret.retrieval.embedder.DEFAULT_MODEL`/`DEFAULT_PRETRAINED` point at the fixture's config
   and weights (what `Collection.create("photos/")` uses), and the literal strings "ViT-B-32"
   and "laion2b_s34b_b79k" in a block are replaced by those two paths. Nothing else in the
   examples is changed. For the tokenizer and diffusion pages photos/ is indexed first and the
   store holds the fixture tokenizer and DiT (tests/fixtures/tiny_dit), as after `vqret
   tokenizer train` and `vqret diffusion train`. Blocks fenced ```py instead are shown, not
   run: they train for minutes or need a cluster. (The site itself is built with
   `mkdocs build --strict` by .ci/run.)
2. No tracked text file holds an absolute path of a particular machine (see MACHINE_PATHS).
3. The generated CLI reference has every command and option; .ci/run runs the README's test
   command, and the README stays short.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from fixtures.shapes import make_shape_folder

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TESTED_PAGES = ["docs/getting-started.md", "docs/python-api.md", "README.md"]
PAGES_WITH_MODELS = ["docs/tokenizer.md", "docs/diffusion.md"]  # need a trained store
TINY_DIT = Path(__file__).resolve().parent / "fixtures" / "tiny_dit"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[str]:
    return BLOCK.findall((ROOT / page).read_text(encoding="utf-8"))


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """A user's working folder: photos/ of drawn shapes, dog.jpg and cat.jpg among them."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    drawn = make_shape_folder(folder, 24, seed=4321)
    for name, (path, *_rest) in zip(("dog.jpg", "cat.jpg"), drawn[:2], strict=True):
        Image.open(path).convert("RGB").save(folder / name, quality=95)
    (folder / "dog.txt").write_text("a dog on the grass\n")  # a sidecar caption: a text row
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vqret.retrieval.embedder.DEFAULT_MODEL", str(TINY_CLIP_CONFIG))
    monkeypatch.setattr("vqret.retrieval.embedder.DEFAULT_PRETRAINED", str(TINY_CLIP_WEIGHTS))
    return folder


def with_fixture_model(code: str) -> str:
    return code.replace('"ViT-B-32"', repr(str(TINY_CLIP_CONFIG))).replace(
        '"laion2b_s34b_b79k"', repr(str(TINY_CLIP_WEIGHTS))
    )


def run_page(page: str) -> dict:
    blocks = python_blocks(page)
    assert blocks, f"{page} has no ```python block to test"
    namespace: dict = {"__name__": f"docs:{page}"}
    for number, code in enumerate(blocks, 1):
        try:
            exec(compile(with_fixture_model(code), f"{page}, python block {number}", "exec"),
                 namespace)
        except Exception as e:  # name the block: a traceback into exec'd text is hard to read
            raise AssertionError(f"{page}, python block {number} failed: {e!r}\n{code}") from e
    return namespace


@pytest.mark.parametrize("page", TESTED_PAGES)
def test_python_examples_run(page, photos, capsys):
    namespace = run_page(page)
    # every page's tour makes a collection of photos/ and searches it
    col = namespace["col"]
    assert col.store.count() == 26
    assert (photos / ".vqret" / "manifest.json").is_file()
    assert "photos" in capsys.readouterr().out  # the printed hits name their files


@pytest.mark.parametrize("page", PAGES_WITH_MODELS)
def test_model_examples_run(page, photos, capsys):
    import shutil

    import vqret

    vqret.Collection.create("photos/").index()
    for part in ("tokenizer", "diffusion"):
        shutil.copytree(TINY_DIT / part, photos / ".vqret" / part)
    namespace = run_page(page)
    if page.endswith("tokenizer.md"):
        assert namespace["pixels"].dtype.name == "uint8" and namespace["pixels"].ndim == 3
        assert Path("dog-rebuilt.png").is_file()
        assert vqret.Collection.open("photos/").info()["codes"]["encoded"] == 26  # every row
    else:
        assert namespace["hits"].generated is not None
        assert [p.name for p in sorted(Path(".").glob("out*.png"))] == [
            "out-1.png", "out-2.png", "out-3.png", "out.png"]
    assert capsys.readouterr().out


# ---- no path of one machine -------------------------------------------------------------
# An absolute path that only exists on the machine that wrote it: a home folder (under
# "home" or "Users", or a Windows "C:\\Users"), root's home ("root"), or this project's build
# workspace and scratch folders ("work", and "tmp" followed by a name). Left alone on purpose:
# paths a reader is meant to replace or that exist everywhere (/data/photos, /mnt/shared,
# /models/..., /etc/passwd in the SQL-sandbox examples, ~/Pictures), the bare temp folder,
# and a path inside a URL (s3://bucket/...). A hit names the file and line.
# The folders' names are joined here at run time, so this file holds none of the paths it
# forbids (it is one of the files it checks).
_S = "/"


def _top(name: str) -> str:
    return _S + name + _S  # e.g. the workspace folder at the root of the filesystem


MACHINE_PATHS = re.compile(
    r"""(?<![\w.~/:-])(?:
        """ + re.escape(_top("work")) + r"""[\w.-]+      # the build machine's workspace
      | """ + re.escape(_top("tmp")) + r"""[\w.-]+       # a file or folder in one machine's temp
      | """ + re.escape(_top("root")) + r"""[\w.-]+      # root's home
      | """ + re.escape(_top("home")) + r"""[\w.-]+/     # a user's home
      | """ + re.escape(_top("Users")) + r"""[\w.-]+/    # a macOS home
      | [A-Za-z]:\\Users\\[\w.-]+                      # a Windows home
    )""",
    re.X,
)
# temp paths that are the same on every machine, each for a reason:
SAME_EVERYWHERE = tuple(_top("tmp") + name for name in (
    "ray",  # Ray's own temp folder (session logs) on every node
    "vqret-leak",  # the SQL sandbox test checks that nothing was written there
    "a%20b.jpg",  # a file:// URL the query parser decodes (test_query.py)
    "a b.jpg",
))


def machine_paths(line: str) -> list[str]:
    return [m.group(0) for m in MACHINE_PATHS.finditer(line)
            if not line[m.start():].startswith(SAME_EVERYWHERE)]


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    files = []
    for name in filter(None, names):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree, not yet committed
        head = path.read_bytes()[:8192]
        if b"\0" not in head:  # binary files (weights, PNGs) can't hold a readable path
            files.append(path)
    return files


def test_machine_path_rule_is_precise():
    t, w, r, h, u = (_top(n) for n in ("tmp", "work", "root", "home", "Users"))
    flagged = [w + "main/README.md", "see " + t + "pkg3/vqret", r + ".cache/x",
               h + "alice/photos", r"C:\Users\bob\Pictures", u + "carol/Pictures/x.jpg"]
    allowed = ["/data/photos/.vqret", "/mnt/shared/photos", "read_csv('/etc/passwd')",
               "mktemp -d under " + t.rstrip(_S), "~/Pictures/.vqret",
               "s3://bucket" + w + "photos", "https://example.org" + t + "x.png",
               "/models/open_clip_model.safetensors"]
    allowed += ["workers' logs: " + t + "ray/session_latest/logs", "file://" + t + "a%20b.jpg"]
    for text in flagged:
        assert machine_paths(text), text
    for text in allowed:
        assert not machine_paths(text), text


def test_no_machine_paths_in_tracked_files():
    this_file = Path(__file__).resolve()
    hits = []
    for path in tracked_text_files():
        if path == this_file:
            continue  # the rule's own examples
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{number}: {p}" for p in machine_paths(line)]
    assert not hits, "paths of one machine in tracked files:\n" + "\n".join(hits)


# ---- the generated CLI reference ---------------------------------------------------------


def test_cli_reference_has_every_command_and_option():
    """docs/cli.md is rendered from the typer app (cli/docs_hooks.py): every command, and every
    option of each, must come out; a renderer that stops seeing them (as mkdocs-click does
    with typer's vendored click) would otherwise still build a page."""
    import typer
    import typer._click as click
    from vqret.cli import docs_hooks
    from vqret.cli.main import app

    page = docs_hooks.render_cli_reference()
    assert docs_hooks.MARKER in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")

    def walk(command, ctx):
        yield command, ctx
        for name in getattr(command, "commands", {}) or {}:
            sub = command.commands[name]
            yield from walk(sub, click.Context(sub, info_name=name, parent=ctx))

    root = typer.main.get_command(app)
    seen = 0
    for command, ctx in walk(root, click.Context(root, info_name="vqret")):
        assert f"`{ctx.command_path}`" in page, ctx.command_path
        for param in command.get_params(ctx):
            if param.name != "help" and not getattr(param, "hidden", False):
                name = param.get_help_record(ctx)[0]
                assert f"| `{name}` |" in page, f"{ctx.command_path}: {name}"
                seen += 1
    assert "vqret search" in page and "--min-score" in page and seen > 100


def test_ci_runs_the_readmes_test_command():
    """.ci/run calls the README's test command: the two must not drift apart."""
    command = ("pip install -e '.[test]' && pip install --no-deps clip-retrieval==2.45.0"
               " && python -m pytest -q")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"```bash\n{command}\n```" in readme
    assert any(line.strip() == command for line in (ROOT / ".ci" / "run").read_text().splitlines())
    assert len(readme.splitlines()) <= 200  # a README a new user reads to the end
