"""What every request passes through: the Host check, the body cap, and the shape of errors.

Every error is JSON `{"error": message, "status": code}`: a QueryError (bad input, from any
layer) keeps its status and headers (Retry-After); Starlette's own 404/405 say what was asked;
a bug is a bare 500 whose trace goes to the server's log only. A failed write (a generated
picture on a full disk, a read-only store) is the one line io_errors.describe words, with
507 for a full disk or quota and 503 otherwise, logged as that line (VQRET_DEBUG=1: the trace).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping, Sequence

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from vqret.retrieval.io_errors import describe
from vqret.retrieval.query import QueryError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def loopback_hosts(host: str) -> list[str] | None:
    """Host headers to accept for a server bound to `host`: loopback names, or any (None)."""
    if host in LOOPBACK_HOSTS or host.startswith("127."):
        return sorted({*LOOPBACK_HOSTS, host})
    return None


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status, headers=headers)


async def query_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QueryError)
    return error_response(exc.status, exc.message, exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"not found: {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, exc.headers)


async def io_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OSError)
    message = describe(exc, "the store is unchanged")
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    debug = os.environ.get("VQRET_DEBUG", "") not in ("", "0")
    logging.getLogger("vqret.server").error("%s %s: %s", request.method, request.url.path,
                                            message, exc_info=exc if debug else None)
    return error_response(507 if full else 503, message)


async def internal_error(request: Request, exc: Exception) -> Response:
    # A bug, not bad input. Starlette re-raises it after this answer, so the server (uvicorn)
    # logs the trace; the client only gets this line.
    return error_response(500, "internal error: see the server's log")


class _BodyTooLarge(Exception):
    pass


class Guard:
    """Plain ASGI middleware: Host check, request body cap, and a header on every response.

    The body cap counts what arrives, so a client that lies about (or omits) Content-Length
    is stopped as soon as it goes over, before the whole body is in memory.
    """

    def __init__(self, app, max_body_bytes: int, allowed_hosts: Sequence[str] | None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = set(allowed_hosts) if allowed_hosts is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                await error_response(400, f"unexpected Host header {host!r}")(scope, receive, send)
                return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def marked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, marked_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        limit = f"{self.max_body_bytes / (1 << 20):g} MiB"
        message = f"request body is larger than the {limit} this server accepts"
        response = error_response(413, message)
        await response(scope, receive, send)



def _host_name(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8000
        return host_header[1:].partition("]")[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


