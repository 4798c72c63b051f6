"""One request body -> one model input, and logits -> the JSON answer: shared by every server.

TorchServe's handler (``handlers/deploylab_handler.py``), the serverless function
(:mod:`deploylab.serverless`) and the custom ASGI server (:mod:`deploylab.asgi_server`) accept the
same bodies and refuse the same bad ones with the same messages, because they all call this module:

- :func:`decode_value` -- a body that may already be parsed (TorchServe parses ``application/json``
  itself) -> uint8 ``(H, H)`` pixels, or :class:`~deploylab.serve.BadRequest` (a 4xx with a message);
- :func:`decode_http` -- raw HTTP bytes plus their content type (what an ASGI app or an API-Gateway
  event carries) -> the same;
- :func:`model_input` -- pixels -> ``data.preprocess`` (the training input contract, imported);
- :func:`top_k` -- logits -> ``{"predictions": [{"label", "index", "probability"}, ...]}``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import data
from .serve import BadRequest

# The limits every server applies (the TorchServe handler reads the same keys from model-config.yaml).
LIMITS: dict[str, int] = {
    "max_bytes": 256 * 1024,  # larger bodies get 413
    "max_side": 512,  # larger images get 413; they are resized to 32x32 anyway
    "min_side": 8,  # smaller images cannot carry a Fashion-MNIST item
}


def limits(**overrides: int) -> dict[str, int]:
    """:data:`LIMITS` with some values replaced (unknown keys are refused)."""
    unknown = set(overrides) - set(LIMITS)
    if unknown:
        raise ValueError(f"unknown input limits {sorted(unknown)}; known: {sorted(LIMITS)}")
    return {**LIMITS, **overrides}


def check_side(shape: tuple[int, ...], lim: dict[str, Any]) -> None:
    """Square, not larger than ``max_side`` (413), not smaller than ``min_side``."""
    h, w = shape[:2]
    if h != w:
        raise BadRequest(f"wrong shape: the model takes square images (Fashion-MNIST is 28x28), got {h}x{w}")
    if h > lim["max_side"]:
        raise BadRequest(f"image too large: {h}x{w} pixels, the limit is {lim['max_side']}x{lim['max_side']}", 413)
    if h < lim["min_side"]:
        raise BadRequest(f"image too small: {h}x{w} pixels, send at least {lim['min_side']}x{lim['min_side']} (28x28 expected)")


def pixels_from_json(obj: Any, lim: dict[str, Any]) -> np.ndarray:
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
    check_side(arr.shape, lim)
    return arr.astype(np.uint8)


def pixels_from_image(raw: bytes, lim: dict[str, Any]) -> np.ndarray:
    """PNG/JPEG bytes as a uint8 grayscale (H, H) image; corrupt or truncated files are refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise BadRequest(f"unsupported image format {img.format}: send PNG or JPEG", 415)
            check_side((img.height, img.width), lim)  # before decoding: no decompression bombs
            img.load()  # raises on truncated or corrupt data
            gray = img.convert("L")
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest("body is not an image: send PNG or JPEG bytes, or a JSON array of pixels", 415) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    return np.array(gray, dtype=np.uint8)  # a writable copy (torch warns about read-only arrays)


def decode_value(value: Any, lim: dict[str, Any] | None = None) -> np.ndarray:
    """One request body -> uint8 (H, H) pixels, or :class:`BadRequest` saying what to send instead.

    ``value`` is raw bytes (or text), or a JSON value a server has already parsed (list, dict, number...).
    """
    lim = lim or LIMITS
    if value is None:
        raise BadRequest("empty request: send PNG/JPEG bytes or a JSON array of pixels as the body")
    if isinstance(value, (list, dict)):  # a server already parsed an application/json body
        return pixels_from_json(value, lim)
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, (bytes, bytearray)):  # a JSON number, true/false
        raise BadRequest(f"JSON body must be a 2-d array of pixels or {{\"pixels\": [...]}}, got a {type(value).__name__}")
    raw = bytes(value)
    if not raw.strip():
        raise BadRequest("empty body: send PNG/JPEG bytes or a JSON array of pixels")
    if len(raw) > lim["max_bytes"]:
        raise BadRequest(f"body too large: {len(raw):,} bytes, the limit is {lim['max_bytes']:,}", 413)
    if raw.lstrip()[:1] in (b"[", b"{"):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"body is not valid JSON ({e}); send a 2-d array of integers 0..255") from None
        return pixels_from_json(obj, lim)
    return pixels_from_image(raw, lim)


def decode_http(body: bytes, content_type: str | None, lim: dict[str, Any] | None = None) -> np.ndarray:
    """Raw HTTP body + content type -> pixels, the way TorchServe's frontend hands bodies to the handler:
    an ``application/json`` body is parsed first (a JSON ``null`` or number is then refused by
    :func:`decode_value`); any other body goes to :func:`decode_value` as bytes."""
    lim = lim or LIMITS
    if len(body) > lim["max_bytes"]:  # before parsing anything
        raise BadRequest(f"body too large: {len(body):,} bytes, the limit is {lim['max_bytes']:,}", 413)
    if (content_type or "").split(";")[0].strip().lower() == "application/json" and body.strip():
        try:
            return decode_value(json.loads(body.decode("utf-8")), lim)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"body is not valid JSON ({e}); send a 2-d array of integers 0..255") from None
    return decode_value(body, lim)


def model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, H) pixels -> float32 (1, 1, 32, 32) through ``data.preprocess`` (the training contract)."""
    return data.preprocess(pixels).numpy()


def top_k(logits: np.ndarray, k: int = 3, names: Sequence[str] = data.CLASS_NAMES) -> list[dict[str, Any]]:
    """One answer per row of logits: ``{"predictions": [{"label", "index", "probability"}, ...]}``, best first."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != len(names):
        raise ValueError(f"expected logits of shape (N, {len(names)}), got {logits.shape}")
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(int(k), probs.shape[1])
    out = []
    for row in probs:
        top = np.argsort(-row, kind="stable")[:k]
        out.append({"predictions": [{"label": names[i], "index": int(i), "probability": float(row[i])} for i in top]})
    return out
