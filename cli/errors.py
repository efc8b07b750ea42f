"""How every command fails: one line on stderr naming the file and the cause, exit status 1
(2 for a bad query), never a traceback; Ctrl-C says what was kept and exits 130."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console

err = Console(stderr=True)

KEPT_COMMITTED = "committed work is kept; run the same command to resume"
KEPT_CHECKPOINT = "the last checkpoint is kept; run the same command to resume"


def fail(message: str, code: int = 1) -> NoReturn:
    from rich.markup import escape

    # escaped: a message may hold brackets ("pip install 'vqret[ray]'") that aren't markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def clean_errors(kept: str = KEPT_COMMITTED) -> Iterator[None]:
    """Known failures become one line and exit status 1; `kept` is what an interrupt keeps."""
    # Imported here: `vqret --help` must not pay for the store's and models' modules.
    from vqret.retrieval.model_spec import ModelConfigError, WeightsUnavailableError
    from vqret.retrieval.query import QueryError
    from vqret.retrieval.store import StoreError

    try:
        yield
    except QueryError as e:  # bad input: exit 2, like a usage error
        fail(str(e), 2)
    except (StoreError, WeightsUnavailableError, ModelConfigError, ValueError) as e:
        fail(str(e))
    except Exception as e:
        if _is_image_error(e):
            fail(str(e))
        raise
    except KeyboardInterrupt:
        err.print(f"interrupted: {kept}")
        raise typer.Exit(130) from None


def _is_image_error(error: Exception) -> bool:
    # An ImageLoadError can only come from a process that imported its module: checked
    # there, so that a text search needn't import PIL (docs/startup.md).
    images = sys.modules.get("vqret.retrieval.images")
    return images is not None and isinstance(error, images.ImageLoadError)
