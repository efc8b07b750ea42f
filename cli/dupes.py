"""`vqret dupes`: groups of near-duplicate images, from stored codes and embeddings.

Wired into the main app by `register(app)` (cli/main.py). The work is in
vqret.retrieval.dupes (beside the store whose rows it reads); this module only parses options
and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from vqret.cli.errors import clean_errors
from vqret.cli.tokenizer import open_store

# vqret.retrieval.dupes' defaults, repeated so that `vqret --help` doesn't import numpy
# (tests/test_tokenizer_store.py checks that they agree).
THRESHOLD = 0.95
CODES_THRESHOLD = 0.25
BANDS = 32
MAX_BUCKET = 16

out = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command("dupes")(dupes)


def dupes(
    store: Annotated[
        Path | None,
        typer.Option("--store", help="Store folder (or its indexed folder); default: the one "
                     "found from here up."),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            min=-1.0,
            max=1.0,
            help="Cosine similarity of the embeddings a pair needs to count as duplicates.",
        ),
    ] = THRESHOLD,
    codes_threshold: Annotated[
        float,
        typer.Option(
            "--codes-threshold",
            min=0.0,
            max=1.0,
            help="Fraction of code-grid positions a pair must share (a JPEG re-save keeps "
            "~65-95%, a resize ~30-100%; unrelated images ~0%).",
        ),
    ] = CODES_THRESHOLD,
    bands: Annotated[
        int,
        typer.Option(min=1, help="LSH bands of 2 random grid positions: more finds pairs "
                     "sharing fewer codes, at more candidates."),
    ] = BANDS,
    max_bucket: Annotated[
        int,
        typer.Option("--max-bucket", min=2, help="Split a band's buckets larger than this "
                     "by more positions (codes many images share, e.g. flat backgrounds)."),
    ] = MAX_BUCKET,
    as_json: Annotated[
        bool,
        typer.Option("--json", help='One JSON object: {"groups": [{"ids", "paths", '
                     '"similarity", "codes_match"}], "images", "candidates", ...}.'),
    ] = False,
) -> None:
    """Groups of near-duplicate images (copies, re-saves, resizes).

    Needs codes: run `vqret tokenizer encode` first.
    Candidates: images whose code grids agree on both positions
    of one of --bands random position pairs (no all-pairs search).
    Duplicates: candidates sharing --codes-threshold of their codes
    whose embeddings have cosine >= --threshold.
    Similarity: cosine to the group's first image.
    """
    with clean_errors():
        from vqret.retrieval.dupes import find_duplicates

        opened = open_store(store)
        report = find_duplicates(
            opened,
            threshold=threshold,
            codes_threshold=codes_threshold,
            bands=bands,
            max_bucket=max_bucket,
        )
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    from rich.table import Table

    if report.groups:
        table = Table(pad_edge=False)
        table.add_column("group", justify="right")
        table.add_column("id", justify="right")
        table.add_column("path", overflow="fold")
        table.add_column("similarity", justify="right")
        table.add_column("codes", justify="right")
        for number, group in enumerate(report.groups, start=1):
            for k, (i, path, sim, codes) in enumerate(
                zip(group.ids, group.paths, group.similarity, group.codes_match, strict=True)
            ):
                table.add_row(
                    str(number) if k == 0 else "",
                    str(i),
                    path,
                    "" if k == 0 else f"{sim:.4f}",
                    "" if k == 0 else f"{codes:.0%}",
                    end_section=k == len(group.ids) - 1,
                )
        out.print(table)
    duplicates = sum(len(g.ids) - 1 for g in report.groups)
    missing = (
        f"; {report.without_codes} images without codes from this tokenizer (run `vqret "
        "tokenizer encode`)"
        if report.without_codes
        else ""
    )
    out.print(
        f"{len(report.groups)} groups, {duplicates} duplicates among {report.images} images "
        f"({report.candidates} candidate pairs){missing}",
        highlight=False,
    )
