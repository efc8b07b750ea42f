"""`vqret info`'s facts about a store: its model, counts, index plan, text encoder, codes and
how many rows each metadata column covers.

Read from the manifest and the rows only: no model loads.
"""

from __future__ import annotations

from typing import Any

from .store import TABLES, Store


def store_facts(store: Store) -> dict[str, Any]:
    """`vqret info`: the facts of a store, as a JSON-able dict."""
    m = store.manifest
    return {
        "store": str(store.path),
        "root": store.source,
        "images": len(store),
        "model": m["model"]["model"],
        "pretrained": m["model"]["weights_id"],
        "dim": m["dim"],
        "schema_version": m["schema_version"],
        "vqret_version": m["vqret_version"],
        "created_at": m["created_at"],
        "updated_at": m["updated_at"],
        "generation": m["generation"],
        "parts": len(store.parts()),
        "texts": store.count("texts"),
        "videos": _video_facts(store),
        "index": _index_facts(store),
        "text_encoder": _text_encoder_fact(store),
        "codes": _codes_facts(store),
        "metadata": metadata_coverage(store),
        "failures": m.get("failures", []),
        # parts missing, truncated or changed on disk: their rows are not searched until
        # `vqret index` re-embeds them (part_health.py)
        "damaged": [d.to_dict() for t in TABLES for d in store.damaged_parts(t)],
    }

def metadata_coverage(store: Store) -> dict[str, Any]:
    """How many rows each metadata column covers: a capture time from EXIF (with its offset)
    or the mtime, a camera, a GPS position, an orientation; the file types and folders."""
    import pyarrow.compute as pc

    rows = store.read_table(["taken_source", "taken_offset_min", "camera_make", "camera_model",
                             "orientation", "file_type", "gps_lat", "folder"])
    source = rows["taken_source"]
    exif = pc.equal(source, "exif")

    def count(values) -> int:
        return int(pc.sum(pc.fill_null(values, False)).as_py() or 0)

    types = pc.value_counts(rows["file_type"].drop_null()).to_pylist() if len(rows) else []
    return {
        "taken_exif": count(exif),
        "taken_exif_offset": count(pc.and_(exif, pc.is_valid(rows["taken_offset_min"]))),
        "taken_mtime": count(pc.equal(source, "mtime")),
        "camera": count(pc.or_(pc.is_valid(rows["camera_make"]),
                               pc.is_valid(rows["camera_model"]))),
        "gps": count(pc.is_valid(rows["gps_lat"])),
        "orientation": count(pc.is_valid(rows["orientation"])),
        "file_types": {t["values"]: t["counts"]
                       for t in sorted(types, key=lambda t: (-t["counts"], t["values"]))},
        "folders": len(pc.unique(rows["folder"].drop_null())),
        # rows of a store made before the columns (or committed without them): `vqret index`
        # adds them without re-embedding
        "missing": source.null_count,
    }

def _video_facts(store: Store) -> dict[str, int]:
    """Videos and their moments (rows) among the image table's rows (video_index.py)."""
    import pyarrow.compute as pc

    video_ids = store.read_table(["video_id"])["video_id"]
    moments = len(video_ids) - video_ids.null_count
    return {"videos": len(pc.unique(video_ids.drop_null())) if moments else 0,
            "moments": moments}


def _text_encoder_fact(store: Store) -> str:
    from .onnx_text import TextEncoderUnavailable, read_meta

    try:
        read_meta(store.path, store.spec)
    except TextEncoderUnavailable as e:
        return f"torch ({e.reason})"
    return "onnx (cold text searches skip torch)"

def _codes_facts(store: Store) -> dict[str, Any]:
    """The tokenizer the codes were last made with, and how many rows have its codes."""
    record = store.manifest.get("tokenizer") or {}
    if not record.get("id"):
        return {"tokenizer": "none yet (vqret tokenizer train / encode)"}
    import pyarrow.compute as pc

    tags = store.read_table(["codes_tokenizer"]).column("codes_tokenizer")
    encoded = int(pc.sum(pc.equal(tags, record["id"])).as_py() or 0)
    return {
        "tokenizer": record["id"][:12],
        "path": record.get("path"),
        "grid": record.get("grid"),
        "encoded": encoded,  # rows holding codes from this tokenizer
    }

def _index_facts(store: Store) -> dict[str, Any]:
    from .index import index_damage, read_meta

    meta = read_meta(store)
    if meta is None:
        return {"kind": "none yet (rebuilt from the rows when searched)"}
    plan = meta.get("plan", {})
    facts = {k: plan.get(k) for k in (
        "kind", "factory", "params", "recall_at_10", "query_ms", "bytes_per_vector",
        "reason", "rebuild_rule", "refine",
    )}
    facts["up_to_date"] = meta.get("generation") == store.table_generation()
    damage = index_damage(store, meta=meta)
    if damage is not None:  # searches rebuild it from the rows meanwhile
        facts["damaged"] = f"{damage}; `vqret index` rebuilds it"
    return facts
