"""The wire protocol every server shares: one request body -> one model input, logits -> the JSON answer.

TorchServe's handler (``handlers/deploylab_handler.py``), the serverless function
(:mod:`deploylab.serving.serverless`) and the custom ASGI server (:mod:`deploylab.serving.asgi`)
accept the same bodies and refuse the same bad ones with the same messages, because they all call
this module:

- :class:`BadRequest` -- the wire error: a 4xx status and a JSON message the client can act on;
- :data:`LIMITS` -- the one set of input limits (the handler and the servers import it);
- :func:`decode_value` -- a body that may already be parsed (TorchServe parses ``application/json``
  itself) -> uint8 ``(H, H)`` pixels, or :class:`BadRequest`;
- :func:`decode_http` -- raw HTTP bytes plus their content type (what an ASGI app or an API-Gateway
  event carries) -> the same; a ``multipart/form-data`` upload (an HTML form, ``curl -F``) with one
  file field of any name is unpacked first, as TorchServe's frontend does;
- :func:`refusal` -- the boundary: whatever a decoder raised, as a :class:`BadRequest` (an error
  nobody foresaw is logged and answered 400, never a 500 and never a failed batch);
- :func:`model_input` -- pixels -> ``data.preprocess`` (the training input contract, imported);
- :func:`top_k` -- logits -> ``{"predictions": [{"label", "index", "probability"}, ...]}``;
- :func:`png_bytes` -- an image encoded as a client uploads it.
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import io
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from .. import data

log = logging.getLogger(__name__)
T = TypeVar("T")


class BadRequest(Exception):
    """A request the client must fix; every server answers it with its 4xx and a JSON message.

    Defined here rather than in the handler file because TorchServe's loader expects exactly one
    class in a handler module.
    """

    KINDS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
             408: "RequestTimeout", 413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "UnprocessableEntity"}

    def __init__(self, message: str, code: int = 400):
        if not 400 <= code < 500:
            raise ValueError(f"a BadRequest is a 4xx, got {code}")
        super().__init__(message)
        self.message, self.code = message, code

    def body(self) -> str:
        """The JSON answer: ``{"code": 400, "type": "BadRequest", "message": "..."}``."""
        return json.dumps({"code": self.code, "type": self.KINDS.get(self.code, "ClientError"), "message": self.message})


# The limits every server applies (the TorchServe handler reads the same keys from model-config.yaml).
LIMITS: dict[str, int] = {
    "max_bytes": 256 * 1024,  # larger bodies get 413
    "max_side": 512,  # larger images get 413; they are resized to 32x32 anyway
    "min_side": 8,  # smaller images cannot carry a Fashion-MNIST item
}
SEND = "send PNG/JPEG bytes or a JSON array of pixels"


def limits(**overrides: int) -> dict[str, int]:
    """:data:`LIMITS` with some values replaced (unknown keys are refused)."""
    unknown = set(overrides) - set(LIMITS)
    if unknown:
        raise ValueError(f"unknown input limits {sorted(unknown)}; known: {sorted(LIMITS)}")
    return {**LIMITS, **overrides}


def refusal(error: BaseException) -> BadRequest:
    """``error`` as the client's 4xx: a :class:`BadRequest` as it is, anything else logged and made a 400.

    The decoders refuse every bad input they know of with a message; this is the net under them
    (a JSON nesting that exhausts the parser's recursion, a value no check foresaw), so that a
    server answers the one bad request with a 400 instead of a 500 or a failed batch.
    """
    if isinstance(error, BadRequest):
        return error
    log.warning("unforeseen %s while decoding a request: %s", type(error).__name__, error, exc_info=error)
    return BadRequest(f"the request could not be decoded ({type(error).__name__}); {SEND}")


def _at_the_boundary(decode: Callable[..., T]) -> Callable[..., T]:
    """Make ``decode`` raise only :class:`BadRequest` (see :func:`refusal`)."""

    @functools.wraps(decode)
    def guarded(*args: Any, **kwargs: Any) -> T:
        try:
            return decode(*args, **kwargs)
        except Exception as e:  # the boundary: an unforeseen decode error is the client's, a 400
            raise refusal(e) from None

    return guarded


def check_side(shape: tuple[int, ...], lim: dict[str, Any]) -> None:
    """Square, not larger than ``max_side`` (413), not smaller than ``min_side``."""
    h, w = shape[:2]
    if h != w:
        raise BadRequest(f"wrong shape: the model takes square images (Fashion-MNIST is 28x28), got {h}x{w}")
    if h > lim["max_side"]:
        raise BadRequest(f"image too large: {h}x{w} pixels, the limit is {lim['max_side']}x{lim['max_side']}", 413)
    if h < lim["min_side"]:
        raise BadRequest(f"image too small: {h}x{w} pixels, send at least {lim['min_side']}x{lim['min_side']} (28x28 expected)")


def parse_json(raw: bytes) -> Any:
    """JSON text -> a Python value, refusing what is not JSON, too deeply nested, or a number too long."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise BadRequest("JSON nested too deeply: send one 2-d array of pixels (two levels of brackets)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and integers over Python's 4300 digits
        raise BadRequest(f"body is not valid JSON ({str(e)[:120]}); send a 2-d array of integers 0..255") from None


def pixels_from_json(obj: Any, lim: dict[str, Any]) -> np.ndarray:
    """A JSON pixel array (or ``{"pixels": ...}``) as a uint8 (H, H) image."""
    if isinstance(obj, dict):
        if "pixels" not in obj:
            raise BadRequest(f"JSON object without a 'pixels' key (keys: {sorted(map(str, obj))[:5]}); send "
                             '{"pixels": [[...], ...]} or the bare 2-d array')
        obj = obj["pixels"]
    if not isinstance(obj, list) or not obj:
        raise BadRequest("JSON pixels must be a non-empty 2-d array of integers 0..255, e.g. 28 rows of 28")
    try:
        arr = np.asarray(obj)
    except (ValueError, TypeError, OverflowError) as e:  # ragged rows, too many dimensions
        raise BadRequest(f"JSON pixels are not a rectangular array ({str(e)[:120]}); send H rows of H integers") from None
    if arr.ndim != 2:
        raise BadRequest(f"wrong shape: expected one 2-d image (H, H), got an array of shape {arr.shape}")
    if arr.dtype == object:  # rectangular, but holding null, strings, lists or integers beyond 64 bits
        raise BadRequest("JSON pixels must be integers 0..255; the array holds null, text or numbers out of range")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise BadRequest(f"JSON pixels must be integers 0..255, got {arr.dtype.name} values")
    if arr.min() < 0 or arr.max() > 255:
        raise BadRequest(f"pixel values must lie in 0..255, got {arr.min()}..{arr.max()}")
    check_side(arr.shape, lim)
    return arr.astype(np.uint8)


def gray8(img: Image.Image) -> np.ndarray:
    """A decoded image as uint8 grayscale, *scaled* from wider modes (16-bit PNGs), never clipped.

    ``Image.convert("L")`` clips a 16-bit grayscale image at 255 instead of scaling it, which
    would answer a valid upload with a wrong class; here 16-bit values v are mapped to
    ``round(v / 257)``, so the 16-bit copy of an 8-bit image (v * 257) decodes to the same pixels.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64)
        if wide.min() < 0 or wide.max() > 65535:
            raise BadRequest(f"unsupported image mode {img.mode} with values outside 16 bits: send 8- or 16-bit PNG", 415)
        return np.round(wide / 257.0).astype(np.uint8)
    if img.mode == "F":
        raise BadRequest("unsupported floating-point image: send 8- or 16-bit PNG, or JPEG", 415)
    return np.array(img.convert("L"), dtype=np.uint8)  # a writable copy (torch warns about read-only arrays)


def check_jpeg_data(raw: bytes) -> None:
    """Refuse a JPEG whose data does not match its header (fewer pixels than it declares, a damaged scan).

    libjpeg decodes such a file "successfully", filling what is missing with grey, and only warns
    ("Corrupt JPEG data: premature end of data segment"); Pillow drops the warning, so the model
    would answer a meaningless image with 200. simplejpeg's strict mode turns the warning into an error.
    """
    try:
        simplejpeg.decode_jpeg(raw, colorspace="GRAY", strict=True)
    except ValueError as e:
        if "corrupt" in str(e).lower() or "premature" in str(e).lower():
            raise BadRequest(f"corrupt JPEG: its data does not match its header ({str(e)[:100]})") from None
        # anything else (a colour space libjpeg-turbo cannot convert, say): Pillow decoded it, keep that


def pixels_from_image(raw: bytes, lim: dict[str, Any]) -> np.ndarray:
    """PNG/JPEG bytes as a uint8 grayscale (H, H) image; corrupt or truncated files are refused."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise BadRequest(f"unsupported image format {img.format}: send PNG or JPEG", 415)
            check_side((img.height, img.width), lim)  # before decoding: no decompression bombs
            img.load()  # raises on truncated or corrupt data
            if img.format == "JPEG":
                check_jpeg_data(raw)
            return gray8(img)
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest(f"body is not an image: {SEND}", 415) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"corrupt or truncated image ({type(e).__name__}: {str(e)[:120]})") from None


@_at_the_boundary
def decode_value(value: Any, lim: dict[str, Any] | None = None) -> np.ndarray:
    """One request body -> uint8 (H, H) pixels, or :class:`BadRequest` saying what to send instead.

    ``value`` is raw bytes (or text), or a JSON value a server has already parsed (list, dict, number...).
    """
    lim = lim or LIMITS
    if value is None:
        raise BadRequest(f"empty request: {SEND} as the body")
    if isinstance(value, (list, dict)):  # a server already parsed an application/json body
        return pixels_from_json(value, lim)
    if isinstance(value, str):
        value = value.encode("utf-8", errors="surrogatepass")
    if not isinstance(value, (bytes, bytearray)):  # a JSON number, true/false
        raise BadRequest(f"JSON body must be a 2-d array of pixels or {{\"pixels\": [...]}}, got a {type(value).__name__}")
    raw = bytes(value)
    if not raw.strip():
        raise BadRequest(f"empty body: {SEND}")
    if len(raw) > lim["max_bytes"]:
        raise BadRequest(f"body too large: {len(raw):,} bytes, the limit is {lim['max_bytes']:,}", 413)
    if raw.lstrip()[:1] in (b"[", b"{"):
        return pixels_from_json(parse_json(raw), lim)
    return pixels_from_image(raw, lim)


@_at_the_boundary
def decode_http(body: bytes, content_type: str | None, lim: dict[str, Any] | None = None) -> np.ndarray:
    """Raw HTTP body + content type -> pixels, the way TorchServe's frontend hands bodies to the handler:
    an ``application/json`` body is parsed first (a JSON ``null`` or number is then refused by
    :func:`decode_value`); any other body goes to :func:`decode_value` as bytes."""
    lim = lim or LIMITS
    if content_type is not None and not isinstance(content_type, str):
        raise BadRequest(f"the Content-Type header must be text, got a {type(content_type).__name__}")
    if len(body) > lim["max_bytes"]:  # before parsing anything
        raise BadRequest(f"body too large: {len(body):,} bytes, the limit is {lim['max_bytes']:,}", 413)
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        body, content_type = form_upload(body, content_type)
        media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == "application/json" and body.strip():
        return decode_value(parse_json(body), lim)
    return decode_value(body, lim)


def form_upload(body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """The one field of a ``multipart/form-data`` body -> its bytes and content type.

    Parsed with the standard library's MIME parser (a form upload is a MIME multipart message). The
    field may have any name; a form without fields, or with more than one, is refused with 400.
    """
    if "boundary=" not in content_type.lower():
        raise BadRequest("multipart/form-data without a boundary= parameter: let the HTTP client build the form")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    parts = [part for part in message.iter_parts() if part.get_content_disposition() == "form-data"] \
        if message.is_multipart() else []
    if len(parts) != 1:
        raise BadRequest(f"a form upload must carry exactly one field with the image, got {len(parts)}: "
                         "e.g. curl -F image=@shirt.png")
    payload = parts[0].get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise BadRequest("the form field is not a file or text value")
    return payload, parts[0].get_content_type() if parts[0].get("content-type") else None


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


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W) image encoded as PNG, as a client would upload it."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise TypeError(f"png_bytes expects a uint8 (H, W) image, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
