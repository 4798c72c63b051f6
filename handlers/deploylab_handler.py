"""TorchServe handler for the deploylab Fashion-MNIST classifier (lesson 05).

It serves the exported student through ONNX Runtime (``backend: onnx``, the default) or the
PyTorch checkpoint (``backend: pytorch``), chosen in the ``handler:`` section of the archive's
model-config.yaml. One request carries one image, either

- PNG or JPEG bytes (any content type; grayscale or colour, square, at most ``max_side`` pixels), or
- a JSON array of pixels: ``[[0, 12, ...], ...]`` (H x H integers in 0..255) or
  ``{"pixels": [[...], ...]}``.

Preprocessing is ``deploylab.data.preprocess``, imported -- the same code that made the training
inputs -- so served and in-process predictions agree. Responses are JSON:
``{"predictions": [{"label": "Trouser", "index": 1, "probability": 0.97}, ...]}`` (top-k).

Bad input never becomes a 500 and never kills the worker: every request of a batch is decoded on
its own; a request that fails gets its own 4xx status (``context.set_response_status``) and a JSON
body ``{"code": 400, "type": "BadRequest", "message": "..."}``, while the other requests of the same
batch are answered normally. (Raising ``ts.utils.util.PredictionException(message, 400)`` would
also give a 4xx, but for the *whole* batch: one bad request would fail its neighbours.)
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from deploylab import data as dl_data
from deploylab.serve import BadRequest  # imported, not defined here: TorchServe wants one class per handler file

log = logging.getLogger(__name__)

DEFAULTS = {
    "backend": "onnx",  # or "pytorch"
    "top_k": 3,
    "max_bytes": 256 * 1024,  # larger bodies get 413 (the frontend's max_request_size is a second, outer limit)
    "max_side": 512,  # larger images get 413; they are resized to 32x32 anyway
    "min_side": 8,  # smaller images cannot carry a Fashion-MNIST item
    "intra_op_threads": 1,  # per worker: workers x threads should not exceed the cores
}


def _payload(request: dict[str, Any]) -> Any:
    """The body of one request: 'data' (multipart field) or 'body' (raw POST), else the first value."""
    for key in ("data", "body"):
        if key in request and request[key] is not None:
            return request[key]
    values = [v for v in request.values() if v is not None]
    return values[0] if values else None


def _pixels_from_json(obj: Any, limits: dict[str, Any]) -> np.ndarray:
    """A JSON pixel array (or ``{"pixels": ...}``) as a uint8 (H, H) image."""
    if isinstance(obj, dict):
        if "pixels" not in obj:
            raise BadRequest(f"JSON object without a 'pixels' key (keys: {sorted(obj)[:5]}); send "
                             '{"pixels": [[...], ...]} or the bare 2-d array')
        obj = obj["pixels"]
    if not isinstance(obj, list) or not obj:
        raise BadRequest("JSON pixels must be a non-empty 2-d array of integers 0..255, e.g. 28 rows of 28")
    try:
        arr = np.asarray(obj)
    except (ValueError, TypeError) as e:  # ragged rows
        raise BadRequest(f"JSON pixels are not a rectangular array ({e}); send H rows of H integers") from None
    if arr.dtype == object or arr.ndim != 2:
        raise BadRequest(f"wrong shape: expected one 2-d image (H, H), got an array of shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise BadRequest(f"JSON pixels must be integers 0..255, got {arr.dtype.name} values")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise BadRequest(f"pixel values must lie in 0..255, got {arr.min()}..{arr.max()}")
    _check_side(arr.shape, limits)
    return arr.astype(np.uint8)


def _check_side(shape: tuple[int, ...], limits: dict[str, Any]) -> None:
    h, w = shape[:2]
    if h != w:
        raise BadRequest(f"wrong shape: the model takes square images (Fashion-MNIST is 28x28), got {h}x{w}")
    if h > limits["max_side"]:
        raise BadRequest(f"image too large: {h}x{w} pixels, the limit is {limits['max_side']}x{limits['max_side']}", 413)
    if h < limits["min_side"]:
        raise BadRequest(f"image too small: {h}x{w} pixels, send at least {limits['min_side']}x{limits['min_side']} (28x28 expected)")


def _pixels_from_image(raw: bytes, limits: dict[str, Any]) -> np.ndarray:
    """PNG/JPEG bytes as a uint8 grayscale (H, H) image; corrupt or truncated files are refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise BadRequest(f"unsupported image format {img.format}: send PNG or JPEG", 415)
            _check_side((img.height, img.width), limits)  # before decoding: no decompression bombs
            img.load()  # raises on truncated or corrupt data
            gray = img.convert("L")
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest("body is not an image: send PNG or JPEG bytes, or a JSON array of pixels", 415) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    return np.array(gray, dtype=np.uint8)  # a writable copy (torch warns about read-only arrays)


def decode(request: dict[str, Any], limits: dict[str, Any]) -> np.ndarray:
    """One request -> uint8 (H, H) pixels, or :class:`BadRequest` saying what to send instead."""
    value = _payload(request)
    if value is None:
        raise BadRequest("empty request: send PNG/JPEG bytes or a JSON array of pixels as the body")
    if isinstance(value, (list, dict)):  # TorchServe already parsed an application/json body
        return _pixels_from_json(value, limits)
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, (bytes, bytearray)):  # a JSON number, true/false
        raise BadRequest(f"JSON body must be a 2-d array of pixels or {{\"pixels\": [...]}}, got a {type(value).__name__}")
    raw = bytes(value)
    if not raw.strip():
        raise BadRequest("empty body: send PNG/JPEG bytes or a JSON array of pixels")
    if len(raw) > limits["max_bytes"]:
        raise BadRequest(f"body too large: {len(raw):,} bytes, the limit is {limits['max_bytes']:,}", 413)
    if raw.lstrip()[:1] in (b"[", b"{"):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"body is not valid JSON ({e}); send a 2-d array of integers 0..255") from None
        return _pixels_from_json(obj, limits)
    return _pixels_from_image(raw, limits)


class DeploylabHandler(BaseHandler):
    """initialize / preprocess / inference / postprocess, with per-request errors (see module doc)."""

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.context, self.manifest = context, context.manifest
        self.cfg = {**DEFAULTS, **(context.model_yaml_config or {}).get("handler", {})}
        self.labels = json.loads((model_dir / "index_to_name.json").read_text())
        serialized = model_dir / self.manifest["model"]["serializedFile"]
        threads = int(self.cfg["intra_op_threads"])
        if self.cfg["backend"] == "onnx":
            from deploylab import export

            # checks the file's sha256 against its model card (shipped in the archive) before serving
            self.session, self.card = export.load_exported(serialized, threads=threads)
            self.input_name = self.session.get_inputs()[0].name
            self.model = None
        elif self.cfg["backend"] == "pytorch":
            from deploylab import models

            meta = json.loads(serialized.with_suffix(".json").read_text())
            torch.set_num_threads(threads)
            self.model = models.build(meta["arch"])
            self.model.load_state_dict(torch.load(serialized, map_location="cpu", weights_only=True))
            self.model.eval()
            self.session, self.card = None, meta
        else:
            raise ValueError(f"handler.backend must be 'onnx' or 'pytorch', got {self.cfg['backend']!r}")
        self.initialized = True
        log.info("deploylab handler ready: backend=%s, threads=%d, pid=%d", self.cfg["backend"], threads, os.getpid())

    def preprocess(self, data: list[dict[str, Any]]) -> tuple[torch.Tensor | None, list[BadRequest | None]]:
        """Decode every request on its own; stack the good ones through ``data.preprocess``."""
        images, errors = [], []
        for request in data:
            try:
                images.append(dl_data.preprocess(decode(request, self.cfg)))
                errors.append(None)
            except BadRequest as e:
                errors.append(e)
        return (torch.cat(images) if images else None), errors

    def inference(self, x: torch.Tensor) -> np.ndarray:
        """Logits for a batch of preprocessed images."""
        if self.session is not None:
            return self.session.run(None, {self.input_name: x.numpy()})[0]
        with torch.inference_mode():
            return self.model(x).numpy()

    def postprocess(self, logits: np.ndarray) -> list[dict[str, Any]]:
        """Top-k labels and softmax probabilities per image."""
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        k = min(int(self.cfg["top_k"]), probs.shape[1])
        out = []
        for row in probs:
            top = np.argsort(-row, kind="stable")[:k]
            out.append({"predictions": [{"label": self.labels[str(i)], "index": int(i), "probability": float(row[i])} for i in top]})
        return out

    def handle(self, data: list[dict[str, Any]], context) -> list[Any]:
        """One answer per request: predictions for good ones, a JSON 4xx for bad ones."""
        self.context = context
        x, errors = self.preprocess(data)
        answers = iter(self.postprocess(self.inference(x)) if x is not None else [])
        out: list[Any] = []
        for idx, err in enumerate(errors):
            if err is None:
                out.append(next(answers))
            else:
                context.set_response_status(err.code, err.message[:200], idx)
                out.append(err.body())
            context.set_response_content_type(idx, "application/json")
        return out
