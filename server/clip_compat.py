"""clip-retrieval's back-end API on vqret stores, so its clients and clip-front work unchanged.

    POST /knn-service  {text | image (base64) | image_url | embedding_input, modality,
                        num_images, num_result_ids, indice_name, deduplicate, ...}
                       -> [{"image_path", "url", "id", "similarity"}, ...]
    POST /metadata     {indice_name, ids} -> [{"id", "metadata": {"image_path", "url"}}, ...]
    GET  /indices-list -> [name, ...]

Differences a client may notice, all on purpose:
- `indice_name` is a store's name (its indexed folder's name unless named at start-up); it may
  be left out when one store is served. `modality` defaults to "image", `num_images` to 20.
- Metadata columns are `image_path` (the stored path, relative to the indexed folder) and `url`
  (where this server serves the original), which clip-front shows as the picture.
- `embedding_input` is L2-normalised first, so `similarity` is always a cosine.
- Unknown ids are left out of /metadata's answer instead of failing the whole request.
- `num_images` and `num_result_ids` above the server's cap (`--max-k`, 1000 by default) are
  clamped to it, not refused: clip-front always asks for 3000 result ids.
- An `image_url` of an image this server serves (`/image/{store}/{id}`, what clip-front's
  "similar" button sends) is searched by that image's stored embedding: nothing is fetched,
  so it works without --allow-url-queries, and the image itself comes first at similarity 1.
- `use_mclip`, `use_safety_model`, `use_violence_detector` and `aesthetic_*` are accepted and
  ignored: vqret has none of those models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from vqret.retrieval.query import IMAGES, TEXTS

from .inputs import RequestError, parse_int
from .served_store import text_rows
from .service import SearchService

DEFAULT_NUM_IMAGES = 20  # clip-front's page size
MAX_METADATA_IDS = 10_000

# clip-retrieval's inputs, as its clients name them (exactly one per request)
CLIP_INPUTS = {"text": "text", "image": "image", "image_url": "image_url",
               "embedding": "embedding_input"}
UrlFor = Callable[[str, int], str]  # (store name, image id) -> absolute URL of the original


def own_image_parser(base: str) -> Callable[[Any], tuple[str, int] | None]:
    """url -> (store name, id) when `url` is one of url_for's (under `base`), else None."""
    prefix = f"{base}image/"

    def parse(url: Any) -> tuple[str, int] | None:
        if not isinstance(url, str) or not url.startswith(prefix):
            return None
        name, sep, raw = url[len(prefix):].partition("/")
        if not sep or not raw.isascii() or not raw.isdigit():
            return None
        return unquote(name), int(raw)

    return parse


def knn_service(
    service: SearchService,
    body: Any,
    url_for: UrlFor,
    *,
    own_image: Callable[[Any], tuple[str, int] | None] = lambda url: None,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Answer a /knn-service request body (already parsed JSON). `own_image` recognises the
    URLs of this server's images; `deadline` bounds the wait for the decode budget."""
    body = _object(body)
    served = service.get(body.get("indice_name"))
    own = own_image(body.get("image_url"))
    if own is not None and own[0] == served.name:
        body = {**body, "image_url": None,
                "embedding_input": service.stored_vector(served, own[1])}
    modality = body.get("modality") or "image"
    if modality not in ("image", "text"):
        raise RequestError(400, f"modality must be 'image' or 'text', not {modality!r}")
    # over the cap: clamped, as clip-front always asks for 3000 ids and can't be told less
    num_images = min(parse_int(_given(body, "num_images", DEFAULT_NUM_IMAGES), "num_images"),
                     service.max_k)
    num_result_ids = min(
        parse_int(_given(body, "num_result_ids", num_images), "num_result_ids"), service.max_k
    )
    if modality == "text" and text_rows(served.store) == 0:
        raise RequestError(
            400,
            f"indice {served.name!r} has no text rows: modality 'text' searches indexed "
            "captions, and this store has none; use modality 'image' to search its images",
        )
    table = TEXTS if modality == "text" else IMAGES
    # clip-retrieval's order: knn over num_result_ids, filter, then keep num_images.
    query = service.build_query(
        served, body, inputs=CLIP_INPUTS, k=min(num_images, num_result_ids), table=table,
        fetch=num_result_ids, dedupe=bool(body.get("deduplicate")) and table == IMAGES,
    )
    results = service.run(served, query, deadline)
    if modality == "text":
        return [_text_row(served.name, r, url_for) for r in results]
    return [_row(served.name, r, url_for) for r in results]


def metadata(service: SearchService, body: Any, url_for: UrlFor) -> list[dict[str, Any]]:
    """Answer a /metadata request body: the metadata of each known id, in request order."""
    body = _object(body)
    served = service.get(body.get("indice_name"))
    ids = body.get("ids")
    if not isinstance(ids, list):
        raise RequestError(400, "ids must be a list of integers")
    if len(ids) > MAX_METADATA_IDS:
        raise RequestError(400, f"at most {MAX_METADATA_IDS} ids per request")
    catalog = served.catalog()
    out = []
    for value in ids:
        image_id = parse_int(value, "each id", minimum=0)
        row = catalog.get(image_id)
        if row is not None:
            meta = {"image_path": row.path, "url": url_for(served.name, image_id)}
            out.append({"id": image_id, "metadata": meta})
    return out


def indices_list(service: SearchService) -> list[str]:
    return service.names()


# --------------------------------------------------------------------------------------------


def _row(name: str, hit: Any, url_for: UrlFor) -> dict[str, Any]:
    # Metadata columns first, then id and similarity: the key order clip-retrieval answers in.
    return {
        "image_path": hit.path,
        "url": url_for(name, hit.id),
        "id": hit.id,
        "similarity": hit.score,
    }


def _text_row(name: str, result: Any, url_for: UrlFor) -> dict[str, Any]:
    row = {"caption": result.text}
    if result.image_id is not None and result.path is not None:
        row["image_path"] = result.path
        row["url"] = url_for(name, result.image_id)
    return {**row, "id": result.id, "similarity": result.score}


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def _given(body: dict[str, Any], key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None or value == "" else value
