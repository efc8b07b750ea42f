"""Query latency of `vqret serve` over HTTP on loopback, next to in-process search.

The same store is searched three ways in one run, so the numbers compare on one machine:

- in process: `Collection.search(text=...)` (model + index) and `search(embedding=...)`
  (index only), one call at a time: the floor that HTTP adds to;
- over HTTP, `POST /api/search` with a text (model + index + HTTP), the same text through
  clip-retrieval's `POST /knn-service`, a query of three text terms (`q: "a + b - c"`: one
  forward pass for the three), and `like` (an id: the stored vector, no model, so index +
  HTTP only), an image upload (a 1600 x 1200 JPEG: decode + model + index + HTTP) and a
  large one (a 49 MP 1-bit PNG of a few KB: the decode budget at work; 503s are counted, not
  failures), from 1, 8 and 50 concurrent clients (`--concurrency`, repeatable).

Each row reports queries per second, p50, p99 and the server's peak RSS over its RSS before
the row (VmHWM reset per row through /proc/PID/clear_refs; Linux). Last, one client's text
searches are timed on the idle server and again while the most clients of the run upload
large images back to back: `text_p99_under_uploads_vs_idle` is the ratio of the two p99s.

`three_terms_vs_three_queries` is the 3-term query's p50 over three times the one-text p50,
both from one client: under 1 when the terms share a forward pass, as they should.

The server is a separate `vqret serve --port 0` process, as a user runs it; the clients are
threads here, each with its own keep-alive connection. Every configuration sends a bounded
number of requests (`requests`), after a few unmeasured warm-up requests per client. With 8
clients, concurrent text queries share forward passes (the server batches them): the mean
batch size is reported from the server's /healthz counters.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from . import serve_load

Log = Callable[[str], Any]

QUERIES = [
    "a photo of a dog", "a red car", "an airplane in the sky", "a face", "a motorbike",
    "a piano", "a watch", "a leopard", "a helicopter", "a sunflower", "a laptop computer",
    "a chair", "a ship at sea", "a butterfly", "a camera", "a bonsai tree",
]
K = 10
WARMUP_PER_CLIENT = 3
# query kind -> what it measures (the table's rows)
KINDS = {
    "text": "text, /api/search (model + index + HTTP)",
    "knn": "text, /knn-service (model + index + HTTP)",
    "terms3": "3 text terms, /api/search (one forward pass + index + HTTP)",
    "like": "like, /api/search (index + HTTP)",
    "upload": "image upload 1600x1200 JPEG, /api/search (decode + model + index + HTTP)",
    "large": "image upload 7000x7000 1-bit PNG, /api/search (decode budget + model + ...)",
}
MAY_BE_BUSY = {"large"}  # kinds whose 503 (decode budget full, Retry-After) is an answer
SERVER_START_S = 180


def run_serve_latency_benchmark(
    source: Path,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "none",
    limit: int = 300,
    requests: int = 200,
    concurrency: Sequence[int] = (1, 8, 50),
    device: str = "cpu",
    search_threads: int = 1,
    kinds: Sequence[str] = tuple(KINDS),
    log: Log | None = None,
) -> dict[str, Any]:
    """Latency p50/p99 (ms) in process and over HTTP. Returns a flat JSON-able dict.

    `source` is a store, an indexed folder, or a folder of images; the last is indexed first
    (at most `limit` images, with `model`/`pretrained`) into a temporary store.
    """
    import torch

    def say(message: str) -> None:
        if log is not None:
            log(message)

    if requests < 1 or not concurrency or min(concurrency) < 1:
        raise ValueError("requests and every concurrency must be >= 1")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"query kinds must be some of {', '.join(KINDS)}, not {unknown}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vqret-bench-serve-") as tmp:
        store_path = _store_for(Path(source), model, pretrained, limit, device, Path(tmp), say)
        from vqret import Collection

        collection = Collection.open(store_path, device=device, num_workers=0)
        n_images = len(collection.store)
        spec = collection.store.spec
        say(f"store {store_path}: {n_images} images, {spec.model} ({spec.weights_id})")
        # The same faiss thread count as the server's, so that the two compare.
        import faiss

        threads_before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(search_threads)
        try:
            in_process = _in_process(collection, requests)
        finally:
            faiss.omp_set_num_threads(threads_before)
        say(
            f"in process: text {in_process['text'][0]:.1f} / {in_process['text'][1]:.1f} ms, "
            f"vector {in_process['vector'][0]:.2f} / {in_process['vector'][1]:.2f} ms "
            "(p50 / p99)"
        )
        ids = [h.id for h in collection.search(text=QUERIES[0], k=min(64, n_images))]
        del collection  # the server loads its own model; don't hold two

        result: dict[str, Any] = {
            "load_avg_1min_before": round(load_before, 2),
            "device": device,
            "model": spec.model,
            "pretrained": spec.weights_id,
            "n_images": n_images,
            "k": K,
            "requests_per_config": requests,
            "torch_threads": torch.get_num_threads(),
            "search_threads": search_threads,
            "cpu_count": os.cpu_count(),
            "in_process_text_ms_p50": round(in_process["text"][0], 2),
            "in_process_text_ms_p99": round(in_process["text"][1], 2),
            "in_process_vector_ms_p50": round(in_process["vector"][0], 3),
            "in_process_vector_ms_p99": round(in_process["vector"][1], 3),
        }
        bodies = {"upload": serve_load.photo_jpeg(), "large": serve_load.bilevel_png()}
        with _server(store_path, device, search_threads) as (url, pid):
            import httpx

            say(f"server at {url}")
            result["server_rss_mib_idle"] = _mib(serve_load.rss(pid))
            for kind in kinds:
                for clients in concurrency:
                    before = httpx.get(url + "healthz").json()
                    rss_before = serve_load.rss(pid)
                    serve_load.reset_peak(pid)
                    lat, wall, busy = _load(url, kind, clients, requests, ids, bodies)
                    peak = serve_load.peak_rss(pid)
                    after = httpx.get(url + "healthz").json()
                    p50, p99 = np.percentile(lat, [50, 99])
                    key = f"http_{kind}_c{clients}"
                    result[f"{key}_ms_p50"] = round(float(p50), 2)
                    result[f"{key}_ms_p99"] = round(float(p99), 2)
                    result[f"{key}_req_per_s"] = round(len(lat) / wall, 1)
                    if peak is not None and rss_before is not None:
                        result[f"{key}_peak_rss_mib"] = _mib(peak)
                        result[f"{key}_peak_over_before_mib"] = _mib(peak - rss_before)
                    if kind in MAY_BE_BUSY:
                        result[f"{key}_busy_503"] = busy
                    calls = after["model_calls"] - before["model_calls"]
                    embedded = after["queries_embedded"] - before["queries_embedded"]
                    if kind in ("text", "knn", "terms3") and calls:
                        result[f"{key}_mean_batch"] = round(embedded / calls, 2)
                    say(
                        f"HTTP {kind}, {clients} client(s): p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
                        f"{len(lat) / wall:.1f} req/s, peak RSS "
                        f"{result.get(f'{key}_peak_rss_mib', '?')} MiB"
                        + (f", {busy} x 503" if kind in MAY_BE_BUSY else "")
                    )
            one = min(concurrency)
            if {"text", "terms3"} <= set(kinds):
                result["three_terms_vs_three_queries"] = round(
                    result[f"http_terms3_c{one}_ms_p50"]
                    / (3 * result[f"http_text_c{one}_ms_p50"]), 3
                )
            if {"text", "large"} <= set(kinds):
                uploaders = max(concurrency)
                idle = serve_load.text_under_uploads(url, QUERIES, requests, 0, b"", K)
                serve_load.reset_peak(pid)
                rss_before = serve_load.rss(pid)
                loaded = serve_load.text_under_uploads(url, QUERIES, requests, uploaders,
                                                       bodies["large"], K)
                peak = serve_load.peak_rss(pid)
                result.update({
                    "text_idle_ms_p50": round(idle["p50"], 2),
                    "text_idle_ms_p99": round(idle["p99"], 2),
                    "text_under_uploads_clients": uploaders,
                    "text_under_uploads_ms_p50": round(loaded["p50"], 2),
                    "text_under_uploads_ms_p99": round(loaded["p99"], 2),
                    "text_p99_under_uploads_vs_idle": round(loaded["p99"] / idle["p99"], 2),
                    "under_uploads_statuses": {str(k): v for k, v in
                                               sorted(loaded["upload_statuses"].items())},
                })
                if peak is not None and rss_before is not None:
                    result["under_uploads_peak_over_before_mib"] = _mib(peak - rss_before)
                say(f"text p99 {idle['p99']:.1f} ms idle, {loaded['p99']:.1f} ms while "
                    f"{uploaders} clients upload 49 MP PNGs "
                    f"({result['text_p99_under_uploads_vs_idle']}x)")
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result as the Markdown table benchmarks/README.md shows."""
    rows = [
        ("in process, text (model + index)", "in_process_text", None),
        ("in process, vector (index only)", "in_process_vector", None),
    ]
    clients = sorted(
        {int(m.group(1)) for k in result if (m := re.match(r"http_text_c(\d+)_ms_p50", k))}
    )
    for kind, what in KINDS.items():
        for c in clients if f"http_{kind}_c{clients[0]}_ms_p50" in result else []:
            label = f"HTTP {what}, {c} client{'s' if c > 1 else ''}"
            rows.append((label, f"http_{kind}_c{c}", f"http_{kind}_c{c}_req_per_s"))
    lines = [
        f"{result['n_images']} images, {result['model']} ({result['pretrained']}), "
        f"{result['device']}, {result['torch_threads']} torch threads, "
        f"{result['search_threads']} faiss thread(s), k={result['k']}, "
        f"{result['requests_per_config']} requests per row; load average "
        f"{result['load_avg_1min_before']} before, {result['load_avg_1min_after']} after",
        "",
        "| query | p50 ms | p99 ms | req/s | peak RSS MiB (over the row's start) | 503s |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, rate in rows:
        per_s = result.get(rate, "") if rate else ""
        batch = result.get(f"{key}_mean_batch")
        if batch:
            label += f" (mean batch {batch})"
        p50, p99 = result[f"{key}_ms_p50"], result[f"{key}_ms_p99"]
        peak = result.get(f"{key}_peak_rss_mib")
        memory = f"{peak} (+{result[f'{key}_peak_over_before_mib']})" if peak else ""
        busy = result.get(f"{key}_busy_503", "")
        lines.append(f"| {label} | {p50} | {p99} | {per_s} | {memory} | {busy} |")
    if "three_terms_vs_three_queries" in result:
        lines += ["", "A query of 3 terms costs "
                  f"{result['three_terms_vs_three_queries']}x three one-term queries (1 client)."]
    if "text_p99_under_uploads_vs_idle" in result:
        lines += ["", f"Text search from 1 client: p50 / p99 {result['text_idle_ms_p50']} / "
                  f"{result['text_idle_ms_p99']} ms on the idle server, "
                  f"{result['text_under_uploads_ms_p50']} / {result['text_under_uploads_ms_p99']}"
                  f" ms while {result['text_under_uploads_clients']} clients upload 49 MP PNGs "
                  f"(p99 {result['text_p99_under_uploads_vs_idle']}x idle; uploads answered "
                  f"{result['under_uploads_statuses']}; peak RSS +"
                  f"{result.get('under_uploads_peak_over_before_mib', '?')} MiB)."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def _store_for(
    source: Path, model: str, pretrained: str, limit: int, device: str, tmp: Path, say: Log
) -> Path:
    """The store to serve: `source` itself, its `.vqret`, or a new one over its images."""
    from vqret.retrieval.store import STORE_DIRNAME

    if (source / "manifest.json").is_file():
        return source
    if (source / STORE_DIRNAME / "manifest.json").is_file():
        return source / STORE_DIRNAME
    if not source.is_dir():
        raise ValueError(f"{source}: not a store nor a folder")
    from vqret import Collection
    from vqret.retrieval.walk import walk_images

    # Links to the first `limit` images, so that a big folder is benchmarked on a slice of it
    # and nothing is written into the user's folder.
    folder = tmp / "images"
    folder.mkdir()
    for i, entry in enumerate(islice(walk_images(source), limit)):
        (folder / f"{i:06d}{Path(entry.relpath).suffix.lower()}").symlink_to(
            (source / entry.relpath).resolve()
        )
    say(f"indexing {limit} images from {source} with {model} ({pretrained})")
    started = time.perf_counter()
    collection = Collection.create(
        folder, tmp / "store", model=model, pretrained=pretrained, device=device
    )
    report = collection.index()
    say(f"indexed {report.embedded} images in {time.perf_counter() - started:.1f} s")
    return tmp / "store"


def _in_process(collection, requests: int) -> dict[str, tuple[float, float]]:
    """(p50, p99) ms of text search and of vector search, one call at a time."""
    for query in QUERIES[:WARMUP_PER_CLIENT]:
        collection.search(text=query, k=K)
    text = []
    for i in range(requests):
        started = time.perf_counter()
        collection.search(text=QUERIES[i % len(QUERIES)], k=K)
        text.append((time.perf_counter() - started) * 1000)
    vectors = [collection.query_embedding(text=q) for q in QUERIES]
    vector = []
    for i in range(requests):
        started = time.perf_counter()
        collection.search(embedding=vectors[i % len(vectors)], k=K)
        vector.append((time.perf_counter() - started) * 1000)
    return {
        "text": tuple(float(x) for x in np.percentile(text, [50, 99])),
        "vector": tuple(float(x) for x in np.percentile(vector, [50, 99])),
    }


def _mib(n: int | None) -> int | None:
    return None if n is None else round(n / (1 << 20))


def _load(
    url: str, kind: str, clients: int, requests: int, ids: Sequence[int],
    bodies: dict[str, bytes],
) -> tuple[list[float], float, int]:
    """`requests` requests from `clients` threads: (latencies in ms, wall seconds, 503s)."""
    import httpx

    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    busy: list[int] = []
    ready = threading.Barrier(clients + 1)

    def body(i: int) -> dict[str, Any]:
        text = QUERIES[i % len(QUERIES)]
        if kind == "text":
            return {"text": text, "k": K}
        if kind == "knn":
            return {"text": text, "num_images": K}
        if kind == "terms3":
            # three different texts, none cached: "a + b - c"
            others = QUERIES[(i + 5) % len(QUERIES)], QUERIES[(i + 11) % len(QUERIES)]
            return {"q": f"{text} + {others[0]} - 0.5:{others[1]}", "k": K}
        return {"like": ids[i % len(ids)], "k": K}

    route = "knn-service" if kind == "knn" else "api/search"

    def post(http, i: int):
        if kind in bodies:  # a multipart upload, as a browser's form sends it
            return http.post(route, files={"image": (f"q{i}.img", bodies[kind])},
                             data={"k": str(K)})
        return http.post(route, json=body(i))

    def client(n: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for i in range(1 if kind in bodies else WARMUP_PER_CLIENT):
                post(http, i + n)
            ready.wait()
            for i in range(shares[n]):
                started = time.perf_counter()
                r = post(http, n * 7 + i)
                latencies[n].append((time.perf_counter() - started) * 1000)
                if r.status_code == 503 and kind in MAY_BE_BUSY:
                    busy.append(1)
                elif r.status_code != 200:
                    errors.append(r.text)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    ready.wait()  # every client is warm and connected: start the clock together
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return [x for per in latencies for x in per], wall, len(busy)


@contextmanager
def _server(store: Path, device: str, search_threads: int) -> Iterator[tuple[str, int]]:
    """`vqret serve` on a free loopback port in a child process; yields (its URL, its pid)."""
    cmd = [sys.executable, "-m", "vqret.cli.main", "serve", "--store", str(store), "--port", "0",
           "--device", device, "--search-threads", str(search_threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + SERVER_START_S
        url = None
        while url is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                line = ""
            if (m := re.search(r"(http://\S+/)", line)) is not None:
                url = m.group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vqret serve didn't start: {proc.stderr.read()[-2000:]}")
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
