"""`vqret search`: the command line's translation to and from one engine Query.

Its arguments become a Query (vqret.retrieval.query: rclip's syntax, --add/--subtract,
--image, --like, --embedding); vqret.Collection runs it through the query engine with the DiT
fallback; this module only prints the results. Wired in by `register(app)` (cli/main.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import typer
from rich.console import Console
from vqret.cli.errors import clean_errors

out = Console()
err = Console(stderr=True)

SYNTAX_HELP = (
    "Terms are joined by ' + ' and ' - ' (spaces around the sign) and weighted with an N: "
    "prefix; a term starting with ./ / ../ ~/ or file:// is an image file, http(s):// an "
    "image URL. Each term's embedding is L2-normalised and weighted, and the sum "
    "renormalised, so a score stays a cosine."
    """

\b
Examples:
  vqret search "a red car"
  vqret search "cat" - "grass" + "2:./dog.jpg"
  vqret search "beach" --subtract "people" --add "0.5:./sunset.jpg"
  vqret search --like 42 - "grass"      # more like image 42, without grass
  vqret search --image query.jpg --dedupe
  vqret search "beach" --after 2023-07-01 --before 2023-08-01 --in trips
  vqret search "dog" --where "camera LIKE '%Pixel%' AND width >= 2000" --type jpg
"""
)


def register(app: typer.Typer) -> None:
    app.command("search", help=search.__doc__ + "\n\n" + SYNTAX_HELP)(search)


def search(
    query: Annotated[
        list[str] | None,
        typer.Argument(help="Query terms: text, images, + and - (syntax above).",
                       show_default=False),
    ] = None,
    image: Annotated[
        list[Path] | None, typer.Option("--image", "-i", help="Add this image as a term.")
    ] = None,
    add: Annotated[
        list[str] | None, typer.Option("--add", "-a", help="Add a term ([N:]text or image).")
    ] = None,
    subtract: Annotated[
        list[str] | None,
        typer.Option("--subtract", "-s", help="Subtract a term ([N:]text or image)."),
    ] = None,
    like: Annotated[
        list[str] | None,
        typer.Option("--like", help="More like the stored image with this id ([N:]ID); the "
                     "image itself is left out."),
    ] = None,
    embedding: Annotated[
        list[Path] | None,
        typer.Option("--embedding", help="Add a raw embedding: a .npy file or a JSON list."),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top", help="Number of results.")] = 10,
    store: Annotated[
        Path | None,
        typer.Option("--store", help="Store folder (default: FOLDER/.vqret, or found upwards)."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    files: Annotated[
        bool, typer.Option("-f", "--files", help="Print paths only, one a line.")
    ] = False,
    grid: Annotated[
        Path | None, typer.Option("--grid", help="Also write the results as one picture.")
    ] = None,
    texts: Annotated[
        bool, typer.Option("--texts", help="Search the text rows (captions) instead of images.")
    ] = False,
    dedupe: Annotated[
        bool, typer.Option("--dedupe", help="Leave out results within cosine 0.94 of a better "
                           "one (clip-retrieval's deduplicate).")
    ] = False,
    generate: Annotated[
        str,
        typer.Option("--generate", help="auto | never | always: draw an image for a query "
                     "that matches nothing well (auto: below --threshold, with a model)."),
    ] = "auto",
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Best score under which auto generates (default: calibrated on the collection)."
        ),
    ] = None,
    generate_out: Annotated[
        Path | None,
        typer.Option("--generate-out", help="PNG for the generated image "
                     "(default: STORE/diffusion/generated/QUERY.png)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Noise seed of the generated image.")] = 0,
    where: Annotated[
        str | None,
        typer.Option(help="SQL condition over the rows' columns (DuckDB), e.g. "
                     "\"taken >= '2023-07-01' AND camera LIKE '%Pixel%'\"."),
    ] = None,
    in_folder: Annotated[
        str | None, typer.Option("--in", help="Only images under this folder (a path prefix "
                                 "or a glob like '*/beach/*').")
    ] = None,
    after: Annotated[
        str | None, typer.Option(help="Only images taken on or after this date (2023-07-01).")
    ] = None,
    before: Annotated[
        str | None, typer.Option(help="Only images taken before this date.")
    ] = None,
    types: Annotated[
        str | None, typer.Option("--type", help="Only these file types: jpg,png,...")
    ] = None,
    camera: Annotated[
        str | None, typer.Option(help="Only images from a camera whose make/model has this.")
    ] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Leave out results scoring below S.")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="Row columns to show with each result: taken,camera,...")
    ] = None,
    per_video: Annotated[
        int | None, typer.Option("--per-video", min=1,
                                 help="At most N moments of each video (1: its best).")
    ] = None,
) -> None:
    """Top-k images (or --texts) for a query of weighted text and image terms."""
    with clean_errors():  # a bad query: one line, exit 2 (cli/errors.py)
        from vqret.retrieval.filters import Filters

        filters = Filters(where=where, folder=in_folder, after=after, before=before,
                          types=types or (), camera=camera, min_score=min_score)
        parsed = _query(query, image, add, subtract, like, embedding, k=k, texts=texts,
                        dedupe=dedupe, generate=generate, threshold=threshold, seed=seed,
                        generate_out=generate_out, filters=filters, columns=columns or (),
                        per_video=per_video)
        from vqret.api import Collection

        # one_shot: one query, then exit (the ONNX session and faiss' threads are set up
        # for that, retrieval/collection.py)
        collection = Collection.open(store, device=device, one_shot=True)
        results = collection.run(parsed)
        if results.note:
            err.print(results.note, highlight=False, soft_wrap=True, markup=False)
        if grid is not None:
            from vqret.retrieval.grid import render_grid

            items = [(_picture(collection, r), f"#{r.rank}  {r.score:.3f}{_at(r)}",
                      PurePosixPath(r.path).name) for r in results if r.path is not None]
            render_grid(items, grid, title=parsed.prompt)
    _print(results, collection, as_json=as_json, files=files, texts=texts)
    if grid is not None and not as_json and not files:
        err.print(f"wrote {grid}", highlight=False)
    if collection.text_export_would_help:
        # This query needed torch (no usable ONNX text encoder): export one now, after the
        # answer is out, so the next search starts without torch.
        sys.stdout.flush()
        if err.is_terminal and not (as_json or files):
            err.print("exporting the text encoder once, so that later searches start faster",
                      highlight=False)
        collection.prepare_fast_text_search()


def _at(result) -> str:
    """" @ 01:23" after a video's path (its moment, as players show time); "" for an image."""
    if result.t is None:
        return ""
    seconds = int(result.t)
    hours, rest = divmod(seconds, 3600)
    clock = f"{rest // 60:02d}:{rest % 60:02d}"
    return f" @ {hours}:{clock}" if hours else f" @ {clock}"


def _fragment(result) -> str:
    return "" if result.t is None else f"#t={result.t:.1f}"


def _picture(collection, result):
    """What a grid cell shows: the image file, or a video's frame at the result's t."""
    path = collection.resolve(result)
    if result.t is None:
        return path
    from vqret.retrieval.video import VideoError, frame_at

    try:
        return frame_at(str(path), result.t, size=384)
    except VideoError:
        return path  # the grid's "unreadable" tile


def _query(query, images, add, subtract, likes, embeddings, *, generate_out, **settings):
    """The command's arguments -> one Query (QueryError for bad ones)."""
    from vqret.retrieval.query import IMAGES, TEXTS, Query, QueryError, Term, parse_terms
    from vqret.retrieval.query import weighted as weighted_value

    terms: list[Term] = []
    if query:
        terms += parse_terms(query)
    terms += [Term.image(str(path), label=str(path)) for path in images or []]
    for raw in add or []:
        terms += parse_terms([raw])
    for raw in subtract or []:
        terms += parse_terms([raw], sign=-1.0)
    for raw in likes or []:
        weight, image_id = weighted_value(raw, _image_id)
        terms.append(Term.like(image_id, weight))
    for path in embeddings or []:
        weight, vector = weighted_value(str(path), _read_embedding)
        terms.append(Term.embedding(vector, weight))
    if not terms:
        raise QueryError('no query: give text, --image PATH, --like ID or --embedding FILE, '
                         'e.g. vqret search "a red car"')
    texts = settings.pop("texts")
    options: dict[str, Any] = {"generate_out": generate_out} if generate_out else {}
    return Query(tuple(terms), table=TEXTS if texts else IMAGES, options=options, **settings)


def _image_id(raw: str) -> int:
    from vqret.retrieval.query import QueryError

    if not raw.isdigit():
        raise QueryError(f"--like takes an image id (an integer), not {raw!r}")
    return int(raw)


def _read_embedding(raw: str):
    import numpy as np
    from vqret.retrieval.query import QueryError

    path = Path(raw)
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).reshape(-1)
        return np.asarray(json.loads(path.read_text()), np.float64)
    except (OSError, ValueError) as e:
        raise QueryError(f"{path}: not an embedding (.npy or a JSON list): {e}") from None


def _print(results, collection, *, as_json: bool, files: bool, texts: bool) -> None:
    generated = results.generated
    if as_json:
        rows = [r.to_dict() for r in results]
        if generated:  # one more entry after the results, shaped like them
            rows.append({"rank": None, "id": None, "path": generated["path"],
                         "score": generated["clip_score"], "generated": generated})
        print(json.dumps(rows))
        return
    if files:
        for r in results:
            # a video's moment as a media fragment, which players and browsers open at t
            print(r.text if texts else f"{collection.resolve(r)}{_fragment(r)}")
        if generated:
            print(generated["path"])
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    extra = list(results.query.columns)
    columns = ("rank", "score", "text", "image") if texts else ("rank", "score", "path", *extra)
    for column in columns:
        table.add_column(column, justify="right" if column in ("rank", "score") else "left",
                         overflow="fold")
    for r in results:
        row = [str(r.rank), f"{r.score:.4f}"]
        values = ["" if (r.columns or {}).get(c) is None else str(r.columns[c]) for c in extra]
        table.add_row(*row, *((r.text, r.path or "") if texts else (r.path + _at(r), *values)))
    if generated:
        table.add_row("gen", f"{generated['clip_score']:.4f}", generated["path"],
                      *([""] * len(extra)))
    out.print(table)
