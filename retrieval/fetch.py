"""An image URL's bytes for a query: http(s) only, capped in size and time, 3 redirects.

The CLI and the Python API fetch a URL term themselves; a server only when started with
--allow-url-queries (it passes its own caps). httpx comes with the serve extra.
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

from .query import QueryError

MAX_URL_BYTES = 10 << 20
URL_TIMEOUT_S = 5.0


def fetch_url(
    url: str, *, max_bytes: int = MAX_URL_BYTES, timeout_s: float = URL_TIMEOUT_S
) -> bytes:
    """GET an http(s) URL: at most `max_bytes`, about `timeout_s` in all, 3 redirects."""
    try:
        import httpx
    except ImportError:
        raise QueryError("image URLs need httpx: pip install httpx") from None

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise QueryError("image_url must be an http:// or https:// URL")
    deadline = time.monotonic() + timeout_s
    # trust_env=False: a server-side fetch must not pick up whatever proxy the shell had.
    client = httpx.Client(
        follow_redirects=True, max_redirects=3, timeout=timeout_s, trust_env=False
    )
    try:
        with client, client.stream("GET", url, headers={"Accept": "image/*"}) as response:
            if response.status_code != 200:
                raise QueryError(f"image_url answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise QueryError(f"image_url is larger than {max_bytes} bytes", status=413)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise QueryError(f"image_url is larger than {max_bytes} bytes", status=413)
                if time.monotonic() > deadline:
                    raise QueryError(f"image_url took longer than {timeout_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise QueryError(f"image_url took longer than {timeout_s:g} s") from None
    except httpx.HTTPError as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QueryError(f"couldn't fetch image_url: {detail}") from None
