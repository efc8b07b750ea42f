"""What `vqret bench serve` adds for load: image request bodies, the server's memory, and text
searches timed while large uploads hammer the decode budget.

- `photo_jpeg()`: a 1600 x 1200 JPEG (a phone photo's scale, ~0.5 MB), for the "upload" kind;
- `bilevel_png()`: a 7000 x 7000 1-bit PNG (49 MP in a few KB, under the 50 MP cap) for the
  "large" kind: cheap to send, ~100 MB to decode, so only the server's budget bounds memory;
- `rss(pid)` / `reset_peak(pid)`: the server process's VmRSS / VmHWM from /proc (Linux), the
  peak reset before each configuration (clear_refs 5) so each row gets its own;
- `text_under_uploads(...)`: one client's text searches while N clients upload large images
  without pause; its p99 is compared with the same client's p99 on an idle server.
"""

from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BIG_SIDE = 7000


def photo_jpeg(seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth gradients and noise, so it compresses like a real one."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = 1200, 1600
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def bilevel_png() -> bytes:
    """A 7000 x 7000 1-bit PNG of a circle: a few KB on the wire, 49 MP to decode."""
    from PIL import Image, ImageDraw

    image = Image.new("1", (BIG_SIDE, BIG_SIDE), 1)
    ImageDraw.Draw(image).ellipse((1500, 1500, 5500, 5500), fill=0)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) << 10 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def rss(pid: int) -> int | None:
    """Resident bytes of process `pid` now (None where /proc can't tell)."""
    return _status(pid).get("VmRSS")


def peak_rss(pid: int) -> int | None:
    """Peak resident bytes of `pid` since it started or since reset_peak."""
    return _status(pid).get("VmHWM")


def reset_peak(pid: int) -> bool:
    """Make `pid`'s VmHWM its current RSS (Linux >= 4.0); False where that isn't possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def text_under_uploads(
    url: str, texts: list[str], requests: int, uploaders: int, image: bytes, k: int
) -> dict[str, Any]:
    """p50/p99 (ms) of `requests` text searches from one client while `uploaders` clients post
    `image` to /api/search back to back; the uploads' status counts."""
    import httpx

    stop = threading.Event()
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    started = threading.Barrier(uploaders + 1)

    def upload() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            started.wait()
            while not stop.is_set():
                r = http.post("api/search", files={"image": ("big.png", image)},
                              data={"k": str(k)})
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=upload, daemon=True) for _ in range(uploaders)]
    for t in threads:
        t.start()
    latencies = []
    errors = []
    with httpx.Client(base_url=url, timeout=120) as http:
        http.post("api/search", json={"text": texts[0], "k": k})  # warm connection
        started.wait()
        time.sleep(1.0)  # let the uploads fill the budget before timing the searches
        for i in range(requests):
            t0 = time.perf_counter()
            r = http.post("api/search", json={"text": texts[i % len(texts)], "k": k})
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                errors.append(r.text)
    stop.set()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise RuntimeError(f"{len(errors)} text searches failed under load, e.g. {errors[0]}")
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "upload_statuses": statuses}
