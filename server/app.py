"""`vqret serve`: the HTTP front of SearchService, as an ASGI app (Starlette, run by uvicorn).

    app = create_app(["photos/"])                       # or {"name": Collection, ...}
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
    GET  /                          the search page (retrieval/web/)
    GET  /healthz                   {"status": "ok", "stores": {...}, ...}
    GET  /api/stores                [{"name", "images", "model", ...}]
    GET|POST /api/search            q (the query syntax, "cat - grass"), terms (weighted
                                    text / image / like / embedding), or one of text, image
                                    upload (multipart or base64), image_url, like=ID,
                                    embedding; k, table, dedupe, generate, threshold, seed;
                                    store -> {"query", "results": [...], "generated"}
    GET  /generated/{store}/{name}  a picture the fallback drew (STORE/diffusion/generated)
    GET  /thumb/{store}/{id}        JPEG thumbnail of an indexed image, by id
    GET  /image/{store}/{id}        the original file, by id (a video: with range requests)
    POST /knn-service, POST /metadata, GET /indices-list: clip-retrieval's API (clip_compat.py)

Files are only ever found by id through the store's rows: no path from a request reaches the
file system. Every error is JSON `{"error": message, "status": code}`; bad input is a 4xx.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import quote

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from vqret.diffusion.fallback import generated_folder
from vqret.retrieval.filters import Filters
from vqret.retrieval.one_line import first_line
from vqret.retrieval.query import IMAGES, TEXTS, QueryError

from . import clip_compat
from .decode_budget import DEFAULT_WAIT_S, PixelBudget, default_budget_mp
from .guard import Guard, http_error, internal_error, io_error, query_error
from .inputs import RequestError, parse_int
from .served_store import ServedStore, StoresArg, open_collections
from .service import SearchService

MAX_BODY_BYTES = 20 << 20  # a phone photo as base64 fits; a video or a disk image doesn't
DEFAULT_K = 20
GENERATED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.png")
MAX_ID = 2**63 - 1  # row ids are int64
# The page loads nothing from elsewhere: the machine may be offline, and it keeps it private.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
# Served as they are; any other format is converted to JPEG for the page.
BROWSER_IMAGE_TYPES = frozenset(
    ["image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp", "image/avif"]
)
# Videos are served as they are, with HTTP range requests (Starlette's FileResponse answers
# Range): the page's <video> seeks to the moment without downloading the whole file.
VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime",
               ".webm": "video/webm", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}
WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# Requests carrying an image run in their own few threads: one waiting for the decode budget
# must not hold one of the threads text searches need (Starlette's pool has 40).
IMAGE_THREADS = 8
IMAGE_FIELDS = ("_upload", "image", "image_url")

def create_app(
    stores: StoresArg = None,
    *,
    allow_url_queries: bool = False,
    device: str = "auto",
    max_body_bytes: int = MAX_BODY_BYTES,
    max_k: int = 1000,
    allowed_hosts: Sequence[str] | None = None,
    cors_origins: Sequence[str] = (),
    url_max_bytes: int = 10 << 20,
    url_timeout_s: float = 5.0,
    decode_budget_mp: float | None = None,
    decode_wait_s: float = DEFAULT_WAIT_S,
    warm: bool = True,
) -> Starlette:
    """The ASGI app serving `stores`: paths or Collections, in a list (named by their indexed
    folders) or a name -> store mapping; a list may also hold (name, store) pairs.

    Loads each distinct model once, now. `allowed_hosts` (e.g. loopback names) refuses other
    Host headers, which stops DNS-rebinding pages from reading a server bound to loopback;
    `cors_origins` lets pages from those origins (e.g. a hosted clip-front) call the API.
    `max_k` caps k (a larger one is a 400) and clip-retrieval's num_images / num_result_ids
    (clamped). Query images decode under one budget of `decode_budget_mp` megapixels in flight
    (default: sized from RAM); a request that can't get its share in `decode_wait_s` is a 503.
    """
    budget_mp = decode_budget_mp if decode_budget_mp is not None else default_budget_mp()
    budget = PixelBudget(int(budget_mp * 1e6), decode_wait_s)
    service = SearchService(
        open_collections(stores, device),
        max_k=max_k,
        allow_url_queries=allow_url_queries,
        url_max_bytes=url_max_bytes,
        url_timeout_s=url_timeout_s,
        decode_budget=budget,
        warm=warm,
    )
    api = _Api(service, max_body_bytes)
    routes = [
        Route("/", api.page, methods=["GET"]),
        Route("/static/{name}", api.static, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/api/stores", api.stores, methods=["GET"]),
        Route("/api/search", api.search, methods=["GET", "POST"]),
        Route("/thumb/{store}/{image_id}", api.thumbnail, methods=["GET"]),
        Route("/image/{store}/{image_id}", api.original, methods=["GET"]),
        Route("/generated/{store}/{name}", api.generated, methods=["GET"]),
        Route("/knn-service", api.knn_service, methods=["POST"]),
        Route("/metadata", api.metadata, methods=["POST"]),
        Route("/indices-list", api.indices_list, methods=["GET"]),
    ]
    middleware = [Middleware(Guard, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts)]
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Content-Type"],
            )
        )

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        service.close()

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            QueryError: query_error,
            HTTPException: http_error,
            OSError: io_error,
            Exception: internal_error,
        },
        lifespan=lifespan,
    )
    app.state.service = service
    return app


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


class _Api:
    def __init__(self, service: SearchService, max_body_bytes: int):
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.web = {name: _web_file(name) for name in WEB_FILES}
        self.image_threads = anyio.CapacityLimiter(IMAGE_THREADS)

    async def _in_thread(self, work, fields: Mapping[str, Any]) -> Any:
        """`work()` in a thread: one of the image threads when the request carries an image."""
        if _carries_image(fields):
            return await anyio.to_thread.run_sync(work, limiter=self.image_threads)
        return await run_in_threadpool(work)

    def _deadline(self) -> float:
        """Until when this request's images may wait for the decode budget, counted from now,
        so that time queued for an image thread counts too."""
        return time.monotonic() + self.service.decode_budget.wait_s

    # ---- the page -------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        return Response(
            self.web["index.html"],
            media_type="text/html",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in WEB_FILES or name == "index.html":
            raise RequestError(404, f"no such file: {name}")
        return Response(
            self.web[name], media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"}
        )

    # ---- facts ----------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        stores = {s.name: len(s.store) for s in self.service.stores.values()}
        batchers = {id(s.batcher): s.batcher for s in self.service.stores.values()}.values()
        return JSONResponse(
            {
                "status": "ok",
                "stores": stores,
                "model_calls": sum(b.batches for b in batchers),
                "queries_embedded": sum(b.items for b in batchers),
                "max_k": self.service.max_k,
                "decode": self.service.decode_budget.stats(),
            }
        )

    async def stores(self, request: Request) -> Response:
        return JSONResponse([s.summary() for s in self.service.stores.values()])

    # ---- search ---------------------------------------------------------------------------
    async def search(self, request: Request) -> Response:
        started = time.perf_counter()
        deadline = self._deadline()
        if request.method == "GET":
            fields: dict[str, Any] = dict(request.query_params)
        elif _is_multipart(request):
            fields = await self._form_fields(request)
        else:
            fields = _object(await _json_body(request))
        served = self.service.get(fields.get("store"))
        settings = self._settings(fields)

        def work():
            query = self.service.build_query(served, fields, upload=fields.get("_upload"),
                                             **settings)
            return self.service.run(served, query, deadline)

        results = await self._in_thread(work, fields)
        root = request.scope.get("root_path", "")
        prefix = f"{root}/{{}}/{quote(served.name, safe='')}/"
        return JSONResponse(
            {
                "store": served.name,
                "query": results.query.describe(),
                "k": results.query.k,
                "took_ms": round((time.perf_counter() - started) * 1000, 2),
                "results": [_result_row(r, prefix) for r in results],
                "generated": _generated(results.generated, served.name, root),
                "note": results.note,  # one line: why nothing was drawn, or nothing passed
            }
        )

    def _settings(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """k, table, dedupe and the generate policy of a search request."""
        k = parse_int(_given(fields, "k", DEFAULT_K), "k", minimum=-(2**63))
        if k > self.service.max_k:
            raise RequestError(400, f"k must be in 1..{self.service.max_k}, not {k}")
        table = _given(fields, "table", TEXTS if _flag(fields.get("texts")) else IMAGES)
        threshold = _given(fields, "threshold", None)
        if isinstance(threshold, str):
            try:
                threshold = float(threshold)
            except ValueError:
                raise RequestError(400, f"threshold must be a number, not {threshold!r}") from None
        seed = parse_int(_given(fields, "seed", 0), "seed", minimum=0)
        columns = fields.get("columns") or []
        if not isinstance(columns, str | list) or not all(isinstance(c, str) for c in columns):
            raise RequestError(400, "columns must be a list of column names, or them in one "
                               "comma-separated string")
        return {
            "columns": columns,
            "filters": _filters(fields.get("filters")),
            "k": k,
            "table": table,
            "dedupe": _flag(fields.get("deduplicate")) or _flag(fields.get("dedupe")),
            "generate": _given(fields, "generate", "auto"),
            "threshold": threshold,
            "seed": seed,
            "per_video": (None if _given(fields, "per_video", None) is None else
                          parse_int(fields["per_video"], "per_video", minimum=1)),
        }

    async def _form_fields(self, request: Request) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        async with request.form(
            max_files=1, max_fields=20, max_part_size=self.max_body_bytes
        ) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in ("image", "file"):
                        raise RequestError(400, f"unexpected file field {key!r}: use 'image'")
                    fields["_upload"] = await value.read()
                    if not fields["_upload"]:
                        raise RequestError(400, "the uploaded image is empty (0 bytes)")
                elif key == "image":
                    raise RequestError(400, "image must be a file upload")
                else:
                    fields[key] = value
        return fields

    # ---- files, by id only ----------------------------------------------------------------
    async def thumbnail(self, request: Request) -> Response:
        served, image_id = self._image_ref(request)
        data, etag = await run_in_threadpool(self.service.thumbnail, served, image_id)
        headers = {"ETag": etag, "Cache-Control": "public, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    async def original(self, request: Request) -> Response:
        served, image_id = self._image_ref(request)
        path = await run_in_threadpool(served.original_path, image_id)
        name = path.rsplit("/", 1)[-1] if isinstance(path, str) else path.name
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        video_type = VIDEO_TYPES.get(os.path.splitext(name)[1].lower())
        if video_type is not None and not isinstance(path, str):
            return FileResponse(path, media_type=video_type,
                                headers={"Cache-Control": "no-cache"})
        if media_type in BROWSER_IMAGE_TYPES:
            headers = {"Cache-Control": "no-cache"}
            if isinstance(path, str):  # a URL: streamed from the object store through fsspec
                stream = await run_in_threadpool(_open_remote, path, image_id)
                return StreamingResponse(_chunks(stream), media_type=media_type, headers=headers)
            return FileResponse(path, media_type=media_type, headers=headers)
        # TIFF, HEIC, ...: browsers can't show them, so the page gets a large JPEG instead.
        data = await run_in_threadpool(self.service.rendition, served, image_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    def _image_ref(self, request: Request) -> tuple[ServedStore, int]:
        raw = request.path_params["image_id"]
        if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_ID:
            raise RequestError(404, f"no image with id {raw!r}: ids are integers")
        return self.service.get(request.path_params["store"]), int(raw)

    # ---- clip-retrieval -------------------------------------------------------------------
    async def knn_service(self, request: Request) -> Response:
        # clip-front posts JSON without a JSON content type: parse the body whatever it says.
        deadline = self._deadline()
        body = await _json_body(request)
        url_for = _url_for(request)
        own_image = clip_compat.own_image_parser(str(request.base_url))

        def work():
            return clip_compat.knn_service(self.service, body, url_for, own_image=own_image,
                                           deadline=deadline)

        rows = await self._in_thread(work, body if isinstance(body, dict) else {})
        return JSONResponse(rows)

    async def metadata(self, request: Request) -> Response:
        body = await _json_body(request)
        url_for = _url_for(request)
        rows = await run_in_threadpool(clip_compat.metadata, self.service, body, url_for)
        return JSONResponse(rows)

    async def indices_list(self, request: Request) -> Response:
        return JSONResponse(clip_compat.indices_list(self.service))


    # ---- generated pictures, by file name in the store's generated folder only -------------
    async def generated(self, request: Request) -> Response:
        served = self.service.get(request.path_params["store"])
        name = request.path_params["name"]
        folder = generated_folder(served.store)
        if not GENERATED_NAME.fullmatch(name) or not (folder / name).is_file():
            raise RequestError(404, f"no generated image {name!r} in store {served.name!r}")
        return FileResponse(folder / name, media_type="image/png",
                            headers={"Cache-Control": "no-cache"})


FILTER_FIELDS = {"where": "where", "in": "folder", "folder": "folder", "after": "after",
                 "before": "before", "type": "types", "types": "types", "camera": "camera",
                 "min_score": "min_score"}


def _filters(value: Any) -> Filters | None:
    """`filters`: {"where", "in", "after", "before", "type", "camera", "min_score"} (or its
    JSON text, from a query string or a form) -> Filters. The SQL runs sandboxed."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError(400, "filters is not valid JSON") from None
    if not isinstance(value, dict):
        raise RequestError(400, 'filters must be an object like {"after": "2023-07-01"}')
    unknown = sorted(set(value) - set(FILTER_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown filter {unknown[0]!r}: use one of "
                           f"{', '.join(sorted(FILTER_FIELDS))}")
    given = {FILTER_FIELDS[k]: v for k, v in value.items() if v is not None and v != ""}
    if isinstance(given.get("types"), list):
        given["types"] = tuple(str(t) for t in given["types"])
    min_score = given.get("min_score")
    if isinstance(min_score, str):
        try:
            given["min_score"] = float(min_score)
        except ValueError:
            raise RequestError(400, f"min_score must be a number, not {min_score!r}") from None
    return Filters(**given)


def _result_row(r: Any, prefix: str) -> dict[str, Any]:
    image_id = r.id if r.text is None else r.image_id
    row = r.to_dict()
    if image_id is not None and r.path is not None:
        row.update(thumbnail_url=prefix.format("thumb") + str(image_id),
                   original_url=prefix.format("image") + str(image_id))
    return row


def _generated(record: dict[str, Any] | None, store: str, root: str) -> dict[str, Any] | None:
    """The fallback's record, with the URL that serves its PNG instead of a local path."""
    if record is None:
        return None
    name = record["path"].replace("\\", "/").rsplit("/", 1)[-1]
    out = {k: v for k, v in record.items() if k != "path"}
    out["url"] = f"{root}/generated/{quote(store, safe='')}/{quote(name)}"
    return out


# --------------------------------------------------------------------------------------------
# Remote originals
# --------------------------------------------------------------------------------------------

STREAM_CHUNK = 1 << 20


def _open_remote(url: str, image_id: int):
    """The object at `url`, opened before the response starts, so a missing one is a 404."""
    from vqret.retrieval.remote import open_url

    try:
        return open_url(url)
    except Exception as e:  # noqa: BLE001 - FileNotFoundError, botocore's errors, ...
        cause = first_line(e)
        raise RequestError(404, f"image {image_id} ({url}) can't be read: {cause}") from None


def _chunks(stream):
    """The object's bytes, 1 MiB at a time (Starlette iterates this in its thread pool)."""
    with stream:
        while block := stream.read(STREAM_CHUNK):
            yield block


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if not body.strip():
        raise RequestError(400, "empty request body: send a JSON object")
    try:
        return json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError(400, "the request body is not valid JSON") from None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def _is_multipart(request: Request) -> bool:
    """A form (multipart, or a plain HTML form's urlencoded body) rather than JSON."""
    kind = request.headers.get("content-type", "")
    return kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


def _carries_image(fields: Mapping[str, Any]) -> bool:
    """Whether a request may decode an image (upload, base64, URL, or in its terms)."""
    if any(fields.get(k) not in (None, "") for k in IMAGE_FIELDS):
        return True
    terms = fields.get("terms")
    if isinstance(terms, str):
        return "image" in terms
    return isinstance(terms, list) and any(
        isinstance(t, dict) and any(t.get(k) not in (None, "") for k in IMAGE_FIELDS)
        for t in terms
    )


def _given(fields: Mapping[str, Any], key: str, default: Any) -> Any:
    value = fields.get(key)
    return default if value is None or value == "" else value


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _url_for(request: Request):
    base = str(request.base_url)

    def url_for(name: str, image_id: int) -> str:
        return f"{base}image/{quote(name, safe='')}/{image_id}"

    return url_for


def _web_file(name: str) -> bytes:
    return resources.files("vqret.server").joinpath("web", name).read_bytes()
