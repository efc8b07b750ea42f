"""Export a store's text tower to ONNX (torch), for the torch-free text search in
onnx_text.py, which describes the bundle and what guards it.

The export runs once per model: `vqret index` calls `ensure_text_encoder`, and so does a
search that found no usable bundle, after it answered through torch.

Only a model that can't take this path is recorded as such (TextEncoderUnavailable without
`rebuild`). A failure of the disk, the memory or a signal is not: writing the export goes
through OSError (io_errors.py), and the next `index` or search exports again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import replace_folder
from .io_errors import annotate, as_os_error, is_environmental
from .one_line import first_line
from .onnx_text import (
    BUNDLE_DIRNAME,
    DATA_FILE,
    FORMAT_VERSION,
    META_FILE,
    MIN_COSINE,
    MODEL_FILE,
    PROBE_TEXT,
    TOKENIZER_FILE,
    OnnxTextEncoder,
    TextEncoderUnavailable,
    bundle_dir,
    library_versions,
    load_text_encoder,
    spec_key,
)
from .text_tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

# Texts checked against torch at export: lengths from empty to past the context, a batch.
EXPORT_CHECKS = (
    PROBE_TEXT,
    "",
    "dog",
    "A Photo of a DOG, on the beach at sunset!!! 🐕 naïve café 日本語",
    "a very long caption that goes on " * 12,
)


def ensure_text_encoder(
    store_path: str | os.PathLike, embedder: Any, *, raise_io_errors: bool = False
) -> str:
    """Export the text encoder unless an up-to-date one is there; never raises (a failure
    only means text queries keep the torch path), except, with `raise_io_errors`, the OSError
    of a write that failed (`vqret index` reports it). Returns a short status for logs."""
    try:
        # the whole check a search makes: meta, sizes, tokenizer, and the probe embedding
        load_text_encoder(store_path, embedder.spec).embed_texts([])
        return "ready"
    except TextEncoderUnavailable as e:
        if not e.rebuild:
            return f"torch path: {e.reason}"
    if not os.access(store_path, os.W_OK):  # a read-only store: searches keep the torch path
        return f"torch path: {store_path} is read-only"
    started = time.perf_counter()
    try:
        export_text_encoder(store_path, embedder)
    except TextEncoderUnavailable as e:
        log.warning("text queries keep the torch path: %s", e.reason)
        return f"torch path: {e.reason}"
    except OSError as e:  # a read-only or full store: the next run tries again
        if raise_io_errors:
            raise
        log.warning("couldn't write the text encoder into %s: %s", store_path, e)
        return f"torch path: {e}"
    except Exception as e:  # noqa: BLE001 - an unforeseen failure must not fail indexing
        log.warning("text queries keep the torch path: export failed (%s: %s)",
                    type(e).__name__, e)
        return f"torch path: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - started
    log.info("exported the text encoder to ONNX in %.1f s", seconds)
    return f"exported in {seconds:.1f} s"


def export_text_encoder(store_path: str | os.PathLike, embedder: Any) -> dict[str, Any]:
    """Export `embedder`'s text tower and tokenizer into the store; returns the meta.

    Raises TextEncoderUnavailable when the model can't take this path; that outcome is
    recorded in the bundle so that searches don't try again with the same libraries.
    """
    key = spec_key(embedder.spec)
    try:
        return _export(Path(store_path), embedder, key)
    except OSError as e:
        annotate(e, "write", bundle_dir(store_path))
        raise
    except TextEncoderUnavailable as e:
        if not e.rebuild:
            _publish(Path(store_path), {META_FILE: _meta_bytes(
                {"format": FORMAT_VERSION, "key": key, "failed": e.reason,
                 "versions": library_versions()})})
        raise


def _export(store_path: Path, embedder: Any, key: dict[str, Any]) -> dict[str, Any]:
    from .text_tokenizer import open_clip_tokenizer_supported

    reason = open_clip_tokenizer_supported(embedder.tokenizer)
    if reason is not None:
        raise TextEncoderUnavailable(reason)
    for name in ("onnxruntime", "onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise TextEncoderUnavailable(f"{name} is not installed", rebuild=True) from None
    import onnxruntime as ort
    import torch

    tokenizer = ClipTokenizer.from_open_clip_vocab(embedder.tokenizer.context_length)
    reference_ids = embedder.tokenizer(list(EXPORT_CHECKS)).numpy()
    ours = tokenizer(list(EXPORT_CHECKS))
    if not np.array_equal(ours, reference_ids):
        raise TextEncoderUnavailable("the torch-free tokenizer gives other ids than open_clip's")

    if embedder.precision != "fp32" or embedder.device.type != "cpu":
        # A search's torch path runs fp32 weights; bf16 weights cast back to fp32 are not
        # those weights. Export what a search would compute.
        from .embedder import Embedder

        embedder = Embedder.from_spec(embedder.spec, device="cpu", precision="fp32",
                                      num_workers=0)
    module, prefix = _exportable_text_tower(embedder)
    _remove_leftovers(store_path)
    tmp = store_path / f".tmp-{BUNDLE_DIRNAME}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        raw = tmp / "raw"
        raw.mkdir()
        _torch_export(module, prefix, tokenizer, raw / MODEL_FILE)
        # ONNX Runtime's graph rewrites run once here (portable level: no CPU-specific
        # layouts); the weights go to one side file, which loading maps instead of parsing.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        options.optimized_model_filepath = str(tmp / MODEL_FILE)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", DATA_FILE
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        try:
            ort.InferenceSession(str(raw / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            found = as_os_error(e, tmp / MODEL_FILE)  # writing the optimised model, a full disk
            if found is not None:
                raise found from e
            raise TextEncoderUnavailable(f"onnxruntime can't load the export: {e}") from None
        shutil.rmtree(raw)
        tokenizer.save(tmp / TOKENIZER_FILE)

        with torch.inference_mode():
            tokens = torch.from_numpy(reference_ids).to(embedder.device)
            reference = torch.nn.functional.normalize(
                embedder.encode_tokens(tokens).float(), dim=-1
            ).cpu().numpy()
        files = {name: (tmp / name).stat().st_size for name in (MODEL_FILE, DATA_FILE,
                                                                TOKENIZER_FILE)}
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "prefix": prefix,
            "tokenizer": {"kind": "clip-bpe", "context_length": tokenizer.context_length},
            "files": files,
            "probe": {"text": PROBE_TEXT, "ids": reference_ids[0].tolist(),
                      "embedding": reference[0].tolist()},
            "versions": library_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / META_FILE).write_bytes(_meta_bytes(meta))
        # The whole path as a search takes it, against torch, before anyone may use it.
        encoder = OnnxTextEncoder(tmp, meta)
        got = encoder._encode(list(EXPORT_CHECKS))
        cosines = (got * reference).sum(axis=1)
        if not (cosines >= MIN_COSINE).all():
            raise TextEncoderUnavailable(
                f"the ONNX text encoder differs from torch (cosine {cosines.min():.6f})"
            )
        del encoder
        replace_folder(tmp, bundle_dir(store_path))
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exportable_text_tower(embedder: Any):
    """(module: tokens -> unnormalised features, whether it takes the EOT prefix), from an
    fp32 embedder on the CPU. With a causal tower, the positions and mask are cut to the
    input's length inside the graph, the way `Embedder.encode_tokens` cuts them."""
    import torch

    from .embedder import _causal_text_tower

    model = embedder.model
    tower = _causal_text_tower(model)

    class EncodeText(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model.encode_text(tokens)

    whole = EncodeText().eval()
    if tower is None:
        return whole, False
    scope = "model." if tower is model else "model.text."
    positions, mask = tower.positional_embedding, tower.attn_mask

    class EncodePrefix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.whole = whole

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, D)
            length = tokens.shape[1]
            cut = {f"{scope}positional_embedding": positions[:length],
                   f"{scope}attn_mask": mask[:length, :length]}
            return torch.func.functional_call(self.whole, cut, (tokens,), strict=False)

    return EncodePrefix().eval(), True


def _torch_export(module: Any, prefix: bool, tokenizer: ClipTokenizer, path: Path) -> None:
    import torch

    example = torch.from_numpy(tokenizer(["a red car", "a small blue dog on the grass"]))
    if prefix:
        example = example[:, : int(example.argmax(dim=1).max()) + 1]
        seq = torch.export.Dim("seq", min=2, max=tokenizer.context_length)
        shapes = {"tokens": {0: torch.export.Dim("batch"), 1: seq}}
    else:
        shapes = {"tokens": {0: torch.export.Dim("batch")}}
    # The exporter prints progress on stdout, where `--json` output goes.
    noise = io.StringIO()
    quiet = (contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise))
    try:
        with quiet[0], quiet[1], torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                module, (example,), input_names=["tokens"], output_names=["features"],
                dynamic_shapes=shapes, dynamo=True, verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - the exporter fails in many ways on exotic models
        if is_environmental(e):  # out of memory, a full temp disk: not the model's fault
            raise
        raise TextEncoderUnavailable(f"torch.onnx.export failed: {first_line(e)}") from None
    # Saving is a write, whatever the exporter raises: never a reason to give the model up.
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            program.save(str(path), external_data=True)
    except Exception as e:
        found = as_os_error(e, path)
        if found is None:
            raise
        raise found from e


def _remove_leftovers(store_path: Path, min_age_s: float = 3600) -> None:
    """Folders of exports killed midway (SIGKILL, power): old enough that no exporter is
    still writing them."""
    now = time.time()
    for pattern in (f".tmp-{BUNDLE_DIRNAME}-*", f".old-{BUNDLE_DIRNAME}-*"):
        for path in store_path.glob(pattern):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > min_age_s:
                    shutil.rmtree(path, ignore_errors=True)


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, indent=1).encode()


def _publish(store_path: Path, files: dict[str, bytes]) -> None:
    """Write a bundle of small files (a failure record) atomically."""
    tmp = store_path / f".tmp-{BUNDLE_DIRNAME}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        replace_folder(tmp, bundle_dir(store_path))
    except OSError as e:
        log.warning("couldn't record the text encoder's state in %s: %s", store_path, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
