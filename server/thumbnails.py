"""Small JPEG previews of indexed images, made on demand and kept in a bounded memory cache.

Thumbnails are cheap to make from the file (JPEGs decode at a reduced draft size) and a
results page asks for the same few dozen again and again, so a small LRU in memory is enough:
nothing is written next to the user's pictures or into the store.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

from PIL import Image
from vqret.retrieval.images import load_image

THUMB_SIZE = 256  # longest side, px: two per row on a phone, crisp at 2x in a 128 px cell
JPEG_QUALITY = 82


def make_thumbnail(
    path: Path | str, size: int = THUMB_SIZE, max_pixels: int | None = None
) -> bytes:
    """JPEG bytes of the image at `path` (or URL), its longest side at most `size` px.

    Raises ImageLoadError when the file no longer decodes.
    """
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    image = load_image(path, draft_size=(size, size), **kwargs)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def make_video_thumbnail(path: Path | str, t: float, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of a video's frame at `t` seconds, its longest side at most `size` px.

    Raises VideoError when the video no longer decodes there."""
    from vqret.retrieval.video import frame_at  # PyAV: only when a video is shown

    image = frame_at(str(path), t, size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


class ThumbnailCache:
    """Thread-safe LRU of thumbnail bytes, bounded by total size."""

    def __init__(self, max_bytes: int = 64 << 20, max_decodes: int = 4):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # A results page asks for 20-100 thumbnails at once; decoding as many 12 MP photos
        # side by side would only multiply memory, not speed, on a few cores.
        self._decodes = threading.BoundedSemaphore(max_decodes)

    def get_or_make(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data
        # Made outside the lock: two requests for a new thumbnail may both make it, which is
        # cheaper than making every other request wait behind one decode.
        with self._decodes:
            data = make()
        with self._lock:
            if key not in self._items and len(data) <= self.max_bytes:
                self._items[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= len(old)
        return data
