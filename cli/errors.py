"""How every command fails: one line on stderr naming the file and the cause, exit status 1
(2 for a bad query), never a traceback; Ctrl-C says what was kept and exits 130.

An I/O fault (full disk, quota, failing disk, permissions, read-only filesystem, a folder
removed mid-run) is worded by vqret.retrieval.io_errors. VQRET_DEBUG=1 prints the traceback
before the line, for a bug report."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console

err = Console(stderr=True)

KEPT_COMMITTED = "committed work is kept; run the same command to resume"
KEPT_CHECKPOINT = "the last checkpoint is kept; run the same command to resume"
# What an I/O fault's line says is kept, after "then run again:"
_KEPT_SHORT = {KEPT_COMMITTED: "committed rows are kept",
               KEPT_CHECKPOINT: "the last checkpoint is kept"}


def debugging() -> bool:
    """VQRET_DEBUG=1: show the traceback of a failure, not only its line."""
    return os.environ.get("VQRET_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 1) -> NoReturn:
    from rich.markup import escape

    # escaped: a message may hold brackets ("pip install 'vqret[ray]'") that aren't markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def clean_errors(kept: str = KEPT_COMMITTED) -> Iterator[None]:
    """Known failures become one line and exit status 1; `kept` is what an interrupt keeps."""
    # Imported here: `vqret --help` must not pay for the store's and models' modules.
    from vqret.retrieval.io_errors import describe
    from vqret.retrieval.model_spec import ModelConfigError, WeightsUnavailableError
    from vqret.retrieval.query import QueryError
    from vqret.retrieval.store import StoreError

    try:
        yield
    except QueryError as e:  # bad input: exit 2, like a usage error
        _trace()
        fail(str(e), 2)
    except (StoreError, WeightsUnavailableError, ModelConfigError, ValueError) as e:
        _trace()
        fail(str(e))
    except OSError as e:  # the disk, not the input: one line that says what to do
        _trace()
        fail(describe(e, _KEPT_SHORT.get(kept, kept)))
    except KeyboardInterrupt:
        err.print(f"interrupted: {kept}")
        raise typer.Exit(130) from None
    except Exception as e:
        if not _is_image_error(e):
            raise
        _trace()
        fail(str(e))


def _is_image_error(error: Exception) -> bool:
    # An ImageLoadError can only come from a process that imported its module: checked
    # there, so that a text search needn't import PIL (docs/startup.md).
    images = sys.modules.get("vqret.retrieval.images")
    return images is not None and isinstance(error, images.ImageLoadError)


def _trace() -> None:
    if debugging():
        traceback.print_exc()
