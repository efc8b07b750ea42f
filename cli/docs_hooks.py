"""The docs build's MkDocs hooks (mkdocs.yml `hooks:`): the CLI reference and the package path.

1. The CLI reference page, generated from the typer app. docs/cli.md holds a marker; at build
time every command of `vqret` (groups included, in the order `vqret --help` lists them)
replaces it with its help text, usage and a table of its arguments and options, read from
the click command typer builds. So an option added in cli/ is documented the moment it
exists, and nobody keeps a second copy by hand. (mkdocs-click does this for plain click
apps; it doesn't recognise the click that typer >= 0.2x vendors, so the page is rendered
here. tests/test_docs.py checks that every command and option comes out.)

2. mkdocstrings finds `vqret` in this checkout. The repository root is the package, so its
folder is named after the checkout, not `vqret`; griffe (mkdocstrings' reader) looks for a
folder named like the package, and an editable install's mapping (`vqret` -> the checkout)
leads it to the checkout's parent. So the build puts a temporary folder holding a `vqret`
link to this checkout first on sys.path: the API pages and the CLI reference document the
tree being built, whatever else is installed.
"""

from __future__ import annotations

import atexit
import html
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

MARKER = "<!-- cli-reference -->"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package's root


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no pipes, no raw HTML, one line."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def _params_table(command: Any, ctx: Any) -> Iterator[str]:
    rows = []
    for param in command.get_params(ctx):
        record = None if getattr(param, "hidden", False) else param.get_help_record(ctx)
        if record is None or param.name == "help":
            continue
        name, help_text = record  # the help text already says [default: ...], [required]
        kind = "argument" if param.param_type_name == "argument" else "option"
        rows.append(f"| `{name}` | {kind} | {_cell(help_text or '')} |")
    if rows:
        yield "| name | kind | description |"
        yield "|---|---|---|"
        yield from rows
        yield ""


def _help_markdown(text: str) -> Iterator[str]:
    """A command's help as Markdown: paragraphs as text, indented lines (examples) as code."""
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = [line for line in paragraph.splitlines() if line.strip() != "\x08"]
        if not lines:
            continue
        head = [line for line in lines if not line.startswith("  ")]
        if len(head) < len(lines) and lines[0] in head and head == lines[: len(head)]:
            # "Examples:" and the indented lines under it
            if head:
                yield _escape(" ".join(head))
                yield ""
            yield "```text"
            yield from (line[2:] for line in lines[len(head):])
            yield "```"
        else:
            yield _escape(" ".join(line.strip() for line in lines))
        yield ""


def _escape(text: str) -> str:
    return html.escape(text, quote=False).replace("*", "\\*")


def _command_docs(command: Any, ctx: Any, depth: int) -> Iterator[str]:
    import typer._click as click  # typer's own click: the classes its commands are made of

    path = ctx.command_path
    yield f"{'#' * min(depth, 6)} `{path}`"
    yield ""
    if command.help:
        yield from _help_markdown(command.help)
    yield "```text"
    yield command.get_usage(ctx).strip()
    yield "```"
    yield ""
    yield from _params_table(command, ctx)
    subcommands = getattr(command, "commands", None)
    if subcommands:
        for name in command.list_commands(ctx):
            sub = subcommands[name]
            if sub.hidden:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            yield from _command_docs(sub, sub_ctx, depth + 1)


def render_cli_reference() -> str:
    """Markdown for every command of `vqret`: help, usage, arguments and options."""
    import typer
    import typer._click as click
    from vqret.cli.main import app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="vqret")
    return "\n".join(_command_docs(root, ctx, depth=2))


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: fill the marker of docs/cli.md with the generated reference."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render_cli_reference())


try:  # before mkdocstrings' own on_config makes its handlers (they read sys.path then)
    from mkdocs.plugins import event_priority
except ImportError:  # mkdocs < 1.4: no priorities; nothing runs this module without mkdocs
    def event_priority(priority: float):
        return lambda f: f


@event_priority(100)
def on_config(config: Any, **_: Any) -> Any:
    """MkDocs hook: `vqret` importable (and findable by griffe) as this checkout."""
    folder = tempfile.mkdtemp(prefix="vqret-docs-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # removes the link, not its target
    os.symlink(CHECKOUT, os.path.join(folder, "vqret"), target_is_directory=True)
    sys.path.insert(0, folder)
    for name in [m for m in sys.modules if m == "vqret" or m.startswith("vqret.")]:
        del sys.modules[name]  # imported from elsewhere before the build started
    return config
