"""Run one embedder from two threads, batching the queries that arrive together.

A server answers many requests at once, but a model is one shared, stateful object: running it
from many threads at the same time only makes them fight for the same cores (and is not
something every backend promises to be safe for). So every model call goes through a worker
thread: one for texts, one for images (the two towers share no state, and inference mode
writes none). While a worker runs a forward pass, new queries of its kind queue up; its next
pass takes all of them (up to `max_batch`) at once, which costs little more than one query on
a GPU and keeps the per-call overhead off the rest on a CPU.

Why a text has its own thread: on a CPU an image costs ~10x a text, and a text that queued
behind an image pass waited for all of it (p99 9x idle with 50 clients uploading). With its
own thread it runs beside the image pass, sharing the cores for a few milliseconds. An image
pass on a CPU still holds at most `max_pixel_batch` images (2): batching them gains little
there, and a short pass leaves the cores to the texts sooner.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from vqret.retrieval.embedder import Embedder

CPU_PIXEL_BATCH = 2


@dataclass
class _Job:
    kind: str  # "text" or "pixels"
    payloads: list  # strs, or (3, H, W) preprocessed tensors: one query's terms, together
    future: Future = field(default_factory=Future)  # -> (len(payloads), D)


class EmbedBatcher:
    """Thread-safe front of an Embedder: `embed_text` / `embed_pixels` block until done.

    >>> batcher = EmbedBatcher(embedder)                      # doctest: +SKIP
    >>> batcher.embed_text("a red car").shape                 # doctest: +SKIP
    (512,)
    """

    def __init__(self, embedder: Embedder, max_batch: int = 32,
                 max_pixel_batch: int | None = None):
        self.embedder = embedder
        self.max_batch = max(1, int(max_batch))
        if max_pixel_batch is None:
            on_cpu = getattr(getattr(embedder, "device", None), "type", "cpu") == "cpu"
            max_pixel_batch = CPU_PIXEL_BATCH if on_cpu else self.max_batch
        self.max_pixel_batch = max(1, int(max_pixel_batch))
        self._jobs: dict[str, queue.SimpleQueue[_Job | None]] = {
            "text": queue.SimpleQueue(), "pixels": queue.SimpleQueue()}
        self._closed = False
        self.batches = 0  # forward passes run, for tests and benchmarks
        self.items = 0  # queries embedded
        self._count_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(kind,), name=f"vqret-embed-{kind}",
                             daemon=True)
            for kind in self._jobs
        ]
        for thread in self._threads:
            thread.start()

    # ---- callers --------------------------------------------------------------------------
    def submit(self, kind: str, payloads: list) -> Future:
        """Queue one query's texts or pixels: they are embedded in the same forward pass."""
        if self._closed:
            raise RuntimeError("the embedder is closed")
        job = _Job(kind, list(payloads))
        self._jobs[kind].put(job)
        return job.future

    def embed_text(self, text: str) -> np.ndarray:
        """(D,) normalised embedding of one text."""
        return self.submit("text", [text]).result()[0]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(N, D) normalised embeddings of a query's texts, in one forward pass."""
        return self.submit("text", texts).result()

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(D,) normalised embedding of one preprocessed (3, H, W) image."""
        return self.submit("pixels", [pixels]).result()[0]

    def embed_pixels_many(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """(N, D) normalised embeddings of a query's preprocessed images, in one pass."""
        return self.submit("pixels", pixels).result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for jobs in self._jobs.values():
                jobs.put(None)
            for thread in self._threads:
                thread.join(timeout=10)

    # ---- the worker -----------------------------------------------------------------------
    def _run(self, kind: str) -> None:
        jobs = self._jobs[kind]
        limit = self.max_batch if kind == "text" else self.max_pixel_batch
        pending: deque[_Job] = deque()
        closing = False
        while True:
            if not pending:
                if closing:
                    return
                job = jobs.get()
                if job is None:
                    return
                pending.append(job)
            while not closing:  # everything queued so far joins this pass, or the next
                try:
                    more = jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # close() while busy: finish what is queued, then stop
                    closing = True
                else:
                    pending.append(more)
            self._embed(kind, _take(pending, kind, limit))

    def _embed(self, kind: str, jobs: list[_Job]) -> None:
        payloads = [p for j in jobs for p in j.payloads]
        try:
            if kind == "text":
                vectors = self.embedder.embed_texts(payloads)
            else:
                vectors = self.embedder.encode_pixels(torch.stack(payloads))
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear about it
            for j in jobs:
                j.future.set_exception(e)
            return
        with self._count_lock:
            self.batches += 1
            self.items += len(jobs)
        start = 0
        for j in jobs:
            j.future.set_result(vectors[start : start + len(j.payloads)])
            start += len(j.payloads)


def _take(pending: deque[_Job], kind: str, limit: int) -> list[_Job]:
    """The oldest jobs of `kind` in `pending`, up to `limit` payloads (at least one job),
    removed from it; the others keep their order."""
    taken: list[_Job] = []
    kept: list[_Job] = []
    count = 0
    full = False
    while pending:
        job = pending.popleft()
        if job.kind == kind and not full and (not taken or count + len(job.payloads) <= limit):
            taken.append(job)
            count += len(job.payloads)
        else:
            full = full or job.kind == kind  # the next of its kind waits its turn: FIFO
            kept.append(job)
    pending.extend(kept)
    return taken
