"""Helpers shared by the server tests: an indexed shapes store and a live server in a thread."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from fixtures.shapes import draw_shape, make_shape_folder

DUPLICATE = "zz_copy_of_red_circle.png"  # a byte-identical copy, for deduplication


def index_shapes(folder: Path, embedder, n: int = 120, seed: int = 1234):
    """Draw `n` shapes (plus one exact duplicate) into `folder` and index them.

    Returns (collection, drawn rows as make_shape_folder gives them).
    """
    from vqret import Collection

    drawn = make_shape_folder(folder, n, seed=seed)
    shutil.copyfile(drawn[0][0], folder / DUPLICATE)
    collection = Collection.create(folder, embedder=embedder)
    report = collection.index()
    assert report.embedded + report.added >= n and not report.failed
    return collection, drawn


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import uvicorn

    # proto=IPPROTO_TCP, or asyncio leaves Nagle on and keep-alive answers wait ~40 ms
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    # The thread dying is the failure; the deadline only stops a hung start from hanging the
    # run, so it is generous: a loaded CI machine can take many seconds to start uvicorn.
    deadline = time.monotonic() + 300
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server didn't start (its thread exited)")
        if time.monotonic() > deadline:
            raise RuntimeError("the test server didn't start in 300 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def png_bytes(color: str, shape: str, seed: int = 99) -> bytes:
    """A drawing the model never saw (another seed than the indexed ones)."""
    buffer = io.BytesIO()
    draw_shape(color, shape, np.random.default_rng(seed)).save(buffer, "PNG")
    return buffer.getvalue()


def path_of(collection, image_id: int) -> str:
    return collection.store.rows_by_id([image_id], ["id", "path"])[image_id]["path"]


def assert_json_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"] and body["status"] == status
    assert "Traceback" not in response.text
    return body["error"]


def knn(client, **body):
    # clip-front posts JSON with no JSON content type: send it the same way.
    return client.post("/knn-service", content=json.dumps(body))
