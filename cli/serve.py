"""`vqret serve` (HTTP API + search page) and `vqret bench serve` (its query latency).

Registered on the main app by `register(app)`, so that cli/main.py needs one line for them.
Heavy imports (torch, starlette, uvicorn) happen inside the commands.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add `serve` to `app`, and `serve` to its `bench` sub-app."""
    app.command("serve")(serve)
    for group in app.registered_groups:
        # Found through the app rather than imported from cli.main: `python -m vqret.cli.main`
        # runs that module as __main__, and importing it again here would run it twice.
        if group.name == "bench" and group.typer_instance is not None:
            group.typer_instance.command("serve")(bench_serve)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _known_errors() -> tuple[type[BaseException], ...]:
    from vqret.retrieval.embedder import ModelConfigError, WeightsUnavailableError
    from vqret.retrieval.images import ImageLoadError
    from vqret.retrieval.store import StoreError

    return (StoreError, WeightsUnavailableError, ModelConfigError, ImageLoadError, ValueError)


# ------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------


def serve(
    store: Annotated[
        list[str] | None,
        typer.Option(
            "--store",
            help="A store, or an indexed folder, as PATH or NAME=PATH; repeat to serve several "
            "(default: the store found from here up). NAME defaults to the indexed folder's name.",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.", min=0, max=65535)] = 8000,
    allow_url_queries: Annotated[
        bool,
        typer.Option(
            "--allow-url-queries", help="Let clip-retrieval's image_url make this server fetch "
            "URLs (capped at 10 MB and 5 s). Off by default."
        ),
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")
    ] = "auto",
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.1, help="Largest request body accepted.")
    ] = 20.0,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin", help="Let pages from this origin call the API (e.g. a hosted "
            "clip-front); repeatable; '*' for any. Off by default.",
        ),
    ] = None,
    search_threads: Annotated[
        int,
        typer.Option(
            "--search-threads", min=1, help="faiss threads per query. Requests already run in "
            "parallel; more threads per query only pay off on big flat indexes.",
        ),
    ] = 1,
    max_k: Annotated[
        int,
        typer.Option(
            "--max-k", min=1, help="Most results per query: a larger k is refused (400); "
            "clip-retrieval's num_images / num_result_ids are clamped to it.",
        ),
    ] = 1000,
    decode_budget_mp: Annotated[
        float | None,
        typer.Option(
            "--decode-budget-mp", min=1.0, help="Megapixels of query images decoded at once, "
            "for the whole server (default: sized from RAM, 50..250); an image that can't get "
            "its share within --decode-wait-s is answered 503 with Retry-After.",
        ),
    ] = None,
    decode_wait_s: Annotated[
        float,
        typer.Option("--decode-wait-s", min=0.0, help="How long a query image may wait for the "
                     "decode budget."),
    ] = 10.0,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Also keep each store in step with its folder "
                           "(vqret watch, in this process): new photos show up as they land.")
    ] = False,
    poll: Annotated[bool, typer.Option("--poll", help="--watch by polling (network mounts).")] = (
        False
    ),
) -> None:
    """Serve stores over HTTP: a search page, a JSON API, and clip-retrieval's API."""
    try:
        import uvicorn
        from vqret.server.app import create_app
        from vqret.server.guard import loopback_hosts
    except ImportError as e:
        _fail(f"vqret serve needs the serve extra ({e.name} is missing): pip install vqret[serve]")
    import faiss

    # faiss's OpenMP pool next to torch's and to concurrent requests oversubscribes the cores:
    # measured here, a 120-vector search took 16 ms with 2 threads on a busy 2-core machine
    # and 0.3 ms with 1.
    faiss.omp_set_num_threads(search_threads)
    stores = _parse_stores(store)
    sock = _bind(host, port)
    try:
        app = create_app(
            stores,
            allow_url_queries=allow_url_queries,
            device=device,
            max_body_bytes=int(max_upload_mb * (1 << 20)),
            allowed_hosts=loopback_hosts(host),
            cors_origins=cors_origin or (),
            max_k=max_k,
            decode_budget_mp=decode_budget_mp,
            decode_wait_s=decode_wait_s,
        )
    except _known_errors() as e:
        sock.close()
        _fail(str(e))
    except OSError as e:  # the disk: one line (io_errors.py), as every command says it
        from rich.markup import escape
        from vqret.retrieval.io_errors import describe

        sock.close()
        _fail(escape(describe(e, "the store is unchanged")))
    service = app.state.service
    bound_port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    summary = ", ".join(
        f"{s.name} ({len(s.store)} images, {s.store.spec.model})" for s in service.stores.values()
    )
    # One line on stdout with the address: scripts (and `vqret bench serve`) read it.
    print(f"serving {summary} at http://{url_host}:{bound_port}/", flush=True)
    if loopback_hosts(host) is None:
        err.print(
            f"[yellow]warning:[/] listening on {host}: anyone who can reach this machine can "
            "search and view the indexed images",
            highlight=False,
        )
    watchers = []
    if watch:
        from vqret.cli.watch import watch_served

        watchers = watch_served(service, poll)
    config = uvicorn.Config(
        app,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for watcher in watchers:
            watcher.stop()
        service.close()


def _parse_stores(values: list[str] | None) -> list[tuple[str | None, str]] | None:
    """`--store PATH` or `--store NAME=PATH`; a PATH that exists with '=' in it stays a path."""
    if not values:
        return None
    stores: list[tuple[str | None, str]] = []
    for value in values:
        name, sep, path = value.partition("=")
        named = sep and name and not Path(value).exists()
        stores.append((name, path) if named else (None, value))
    return stores


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, made here so that a busy port is one clear line, not a trace."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name such as localhost
    # IPPROTO_TCP spelled out: asyncio only sets TCP_NODELAY on connections of a socket whose
    # proto says TCP, and without it every keep-alive response waits ~40 ms (Nagle + delayed
    # ACK) before it reaches the client.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; pass another --port (0 picks a free one)" if e.errno == 98 else ""
        _fail(f"can't listen on {host}:{port}: {e.strerror or e}{hint}")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# ------------------------------------------------------------------------------------------
# bench serve
# ------------------------------------------------------------------------------------------


def bench_serve(
    source: Annotated[
        Path, typer.Argument(help="A store, an indexed folder, or a folder of images to index.")
    ],
    model: str = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="'none' = random weights")] = "none",
    limit: Annotated[int, typer.Option(help="Images to index when SOURCE has no store.")] = 300,
    requests: Annotated[
        int, typer.Option(help="Timed requests per client count and query kind.", min=1)
    ] = 200,
    concurrency: Annotated[
        list[int] | None,
        typer.Option(help="Concurrent clients; repeatable (default: 1, 8, 50)."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")
    ] = "cpu",
    search_threads: Annotated[int, typer.Option("--search-threads", min=1)] = 1,
    kinds: Annotated[
        list[str] | None,
        typer.Option("--kind", help="Query kinds to time; repeatable: text, knn, terms3, like, "
                     "upload (a 1600x1200 JPEG), large (a 49 MP 1-bit PNG) (default: all)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Query latency p50/p99, QPS and the server's peak RSS over HTTP (loopback) for each
    request mix and client count, next to in-process Collection.search; a 3-term query against
    three 1-term ones; text p99 while large uploads load the server, against idle."""
    try:
        from vqret.benchmarks.serve_latency import format_table, run_serve_latency_benchmark

        result = run_serve_latency_benchmark(
            source,
            model=model,
            pretrained=pretrained,
            limit=limit,
            requests=requests,
            concurrency=tuple(concurrency or (1, 8, 50)),
            device=device,
            search_threads=search_threads,
            **({"kinds": tuple(kinds)} if kinds else {}),
            log=None if as_json else err.print,
        )
    except _known_errors() as e:
        _fail(str(e))
    except ImportError as e:
        _fail(f"vqret bench serve needs the serve extra ({e.name} is missing)")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))  # plain: a Markdown table must not be re-wrapped
