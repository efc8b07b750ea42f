"""The store's text tower exported to ONNX, so a text query needs neither torch nor open_clip.

A cold `vqret search "red car"` used to spend seconds importing torch and torchvision before
it embedded four words. The text tower is exported once per store (onnx_export.py: by `vqret
index`, or by the first search that finds none) into `<store>/text_encoder/`:

    text.onnx, text.onnx.data   the tower, graph-optimised by ONNX Runtime ahead of time, its
                                weights in a side file that ONNX Runtime maps, not parses
    bpe_merges.txt              CLIP's BPE merge rules, for `tokenizers` (text_tokenizer.py)
    meta.json                   the model it was made from (name, weights id, config hash),
                                file sizes, and a probe: a text, its token ids and its torch
                                fp32 embedding

The tower is exported with a dynamic sequence length and fed only the prefix up to the
end-of-text token, exactly as `Embedder.encode_tokens` does (the tower is causal and pools at
that token), so the embedding equals the torch path's (cosine >= 0.9999, checked at export).

Nothing here is ever a silent wrong answer: a bundle for another model (stale), a file of the
wrong size, a tokenizer that gives other ids, or an encoder whose probe embedding drifts is
refused, and the caller falls back to torch. The whole folder is replaced in one rename, so a
reader sees the old bundle, the new one, or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .model_spec import ModelSpec
from .one_line import first_line
from .text_tokenizer import ClipTokenizer

BUNDLE_DIRNAME = "text_encoder"
FORMAT_VERSION = 2  # 2: BPE merge rules in a text file
MODEL_FILE = "text.onnx"
DATA_FILE = "text.onnx.data"
TOKENIZER_FILE = "bpe_merges.txt"
META_FILE = "meta.json"
PROBE_TEXT = "a photo of a red car"
# ONNX Runtime and torch agree to ~1e-7 per component; anything below this is a broken file.
MIN_COSINE = 0.9999



class TextEncoderUnavailable(Exception):
    """The ONNX text encoder can't be used; `reason` says why, `rebuild` whether exporting
    again could help (a missing, stale or damaged bundle) or not (unsupported, failed)."""

    def __init__(self, reason: str, rebuild: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.rebuild = rebuild


def bundle_dir(store_path: str | os.PathLike) -> Path:
    return Path(store_path) / BUNDLE_DIRNAME


def spec_key(spec: ModelSpec) -> dict[str, Any]:
    """What ties a bundle to one model: a different model or config never uses it."""
    config = json.dumps(spec.model_config, sort_keys=True).encode()
    return {
        "model": spec.model,
        "weights_id": spec.weights_id,
        "embed_dim": spec.embed_dim,
        "config_sha256": hashlib.sha256(config).hexdigest(),
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "open_clip_torch", "onnxruntime", "onnx", "onnxscript"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "none"
    return out


def read_meta(store_path: str | os.PathLike, spec: ModelSpec) -> dict[str, Any]:
    """The bundle's meta.json when it belongs to this model; raises TextEncoderUnavailable."""
    path = bundle_dir(store_path) / META_FILE
    if not path.is_file():
        raise TextEncoderUnavailable("no exported text encoder yet", rebuild=True)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TextEncoderUnavailable(f"{path}: unreadable ({e})", rebuild=True) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise TextEncoderUnavailable(f"{path}: another format", rebuild=True)
    if meta.get("key") != spec_key(spec):
        raise TextEncoderUnavailable(f"{path}: made for another model (stale)", rebuild=True)
    if "failed" in meta:
        # An export that failed with these library versions fails again: don't retry it on
        # every search. New versions get another try, and so does a record an older vqret
        # made of a full disk or the like (io_errors.looks_environmental): not the model's.
        from .io_errors import looks_environmental

        if meta.get("versions") == library_versions() and not looks_environmental(
            str(meta["failed"])
        ):
            raise TextEncoderUnavailable(f"export failed earlier: {meta['failed']}")
        raise TextEncoderUnavailable(f"export failed earlier: {meta['failed']}", rebuild=True)
    return meta


def bundle_looks_ready(store_path: str | os.PathLike, spec: ModelSpec) -> bool:
    """Whether the store holds a bundle for this model whose files have their recorded
    sizes: what a run that loads no model checks (no ONNX Runtime, no probe)."""
    try:
        meta = read_meta(store_path, spec)
    except TextEncoderUnavailable:
        return False
    folder = bundle_dir(store_path)
    try:
        return all((folder / name).stat().st_size == size
                   for name, size in meta["files"].items())
    except (OSError, KeyError, AttributeError, TypeError):
        return False


# --------------------------------------------------------------------------------------------
# Inference (no torch)
# --------------------------------------------------------------------------------------------


class OnnxTextEncoder:
    """Texts -> (N, D) float32 L2-normalised embeddings through ONNX Runtime.

    `one_shot` is for a process that answers one query and exits: ONNX Runtime then skips
    pre-packing the weights (~0.5 s for ViT-B-32 at load, repaid only over many queries),
    and the tokenizer builds its BPE for the query's words only (text_tokenizer.py).
    """

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any], *,
                 one_shot: bool = False):
        """The bundle in `folder`, described by `meta` (see `load_text_encoder`)."""
        folder = Path(folder)
        for name, size in meta["files"].items():
            path = folder / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                raise TextEncoderUnavailable(
                    f"{path}: {actual} bytes, expected {size} (damaged)", rebuild=True
                )
        try:
            import onnxruntime as ort
        except ImportError:
            raise TextEncoderUnavailable("onnxruntime is not installed") from None
        tok = meta["tokenizer"]
        try:
            self.tokenizer = ClipTokenizer.from_file(
                folder / TOKENIZER_FILE, tok["context_length"], one_shot=one_shot
            )
        except Exception as e:  # noqa: BLE001 - any parse error means a damaged file
            raise TextEncoderUnavailable(f"{folder / TOKENIZER_FILE}: {e}", rebuild=True) from None
        probe = meta["probe"]
        if self.tokenizer(probe["text"])[0].tolist() != probe["ids"]:
            raise TextEncoderUnavailable("the saved tokenizer gives other ids", rebuild=True)
        options = ort.SessionOptions()
        # Optimised at export (the extended level, which includes the basic one): running
        # the rewrites again finds nothing to do and cost ~50 ms of a cold search's session
        # load (85 -> 35 ms for ViT-B-32, docs/startup.md). The probe check still guards it.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        if one_shot:
            options.add_session_config_entry("session.disable_prepacking", "1")
            # idle worker threads spin-wait for the next run, which never comes
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise TextEncoderUnavailable(
                f"{folder / MODEL_FILE}: {first_line(e)}", rebuild=True
            ) from None
        self.prefix = bool(meta["prefix"])
        self.embed_dim = int(meta["key"]["embed_dim"])
        self._probe = (probe["text"], np.asarray(probe["embedding"], np.float32))
        self._verified = False

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 L2-normalised text embeddings.

        The first call also embeds the probe text in the same batch (almost free: a batch
        costs about what one query does) and refuses the encoder if it no longer matches.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not self._verified:
            vectors = self._encode([self._probe[0], *texts])
            cosine = float(vectors[0] @ self._probe[1])
            if not cosine >= MIN_COSINE:  # also catches NaN
                raise TextEncoderUnavailable(
                    f"probe embedding drifted (cosine {cosine:.6f})", rebuild=True
                )
            self._verified = True
            return vectors[1:]
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        tokens = self.tokenizer(texts)
        if self.prefix:
            # positions after the last end token change nothing (causal tower, EOT pooling)
            tokens = tokens[:, : int(tokens.argmax(axis=1).max()) + 1]
        features = self.session.run(None, {"tokens": tokens})[0].astype(np.float32)
        # as torch.nn.functional.normalize (eps 1e-12)
        norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return features / norms


def load_text_encoder(
    store_path: str | os.PathLike, spec: ModelSpec, *, one_shot: bool = False
) -> OnnxTextEncoder:
    """The store's ONNX text encoder; raises TextEncoderUnavailable (with why) otherwise."""
    meta = read_meta(store_path, spec)
    return OnnxTextEncoder(bundle_dir(store_path), meta, one_shot=one_shot)


def __getattr__(name: str) -> Any:
    # The export side (onnx_export.py) imports torch: only when it is asked for.
    if name in ("export_text_encoder", "ensure_text_encoder"):
        from . import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
