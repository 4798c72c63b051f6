"""Property-based tests of the decoding path every server shares (hypothesis).

Thousands of generated bodies, content types and API-Gateway events -- random bytes, arbitrary JSON,
real images in every mode and size, corrupted and truncated real PNGs -- and one property: each
ends in valid pixels (or a 200 answer) or in a 4xx-shaped refusal with a message, never in any other
exception. Found failures are shrunk to the smallest body by hypothesis and printed.
"""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deploylab import data
from deploylab.serving import protocol, serverless
from deploylab.serving.protocol import BadRequest

MANY = settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=30) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=900,
)
pixel_arrays = st.integers(min_value=1, max_value=40).flatmap(
    lambda side: st.lists(st.lists(st.integers(min_value=-2, max_value=300), min_size=side, max_size=side),
                          min_size=side, max_size=side))


@st.composite
def images(draw) -> bytes:
    """A real encoded image: any of PIL's common modes, any size up to 64, PNG or JPEG."""
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "1", "I;16", "P"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG"])) if mode in ("L", "RGB") else "PNG"
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@functools.cache
def _real_pngs() -> tuple[bytes, ...]:
    return tuple(protocol.png_bytes(im) for im in data.raw_split("test", 16)[0])


@st.composite
def damaged_pngs(draw) -> bytes:
    """A real test image's PNG, cut short or with a few bytes changed."""
    raw = bytearray(draw(st.sampled_from(_real_pngs())))
    if draw(st.booleans()):
        return bytes(raw[: draw(st.integers(0, len(raw)))])
    for _ in range(draw(st.integers(1, 8))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


bodies = st.one_of(
    st.binary(max_size=4_000),
    json_values.map(lambda v: json.dumps(v).encode()),
    pixel_arrays.map(lambda v: json.dumps(v).encode()),
    pixel_arrays.map(lambda v: json.dumps({"pixels": v}).encode()),
    st.integers(1, 60_000).map(lambda n: b"[" * n),
    images(),
    damaged_pngs(),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(["application/json", "application/json; charset=utf-8", "image/png", "image/jpeg",
                     "text/plain", "application/octet-stream", "multipart/form-data",
                     "multipart/form-data; boundary=xyz", "multipart/form-data; boundary="]),
    st.text(max_size=30),
)


@st.composite
def form_uploads(draw) -> tuple[bytes, str]:
    """A multipart/form-data body of 0-3 fields (any names, any bodies above, odd headers), sometimes cut short."""
    boundary = draw(st.sampled_from(["b0undary", "----x", "a" * 70]))
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.text(max_size=8)).replace('"', "").replace("\r", "").replace("\n", "")
        head = f'Content-Disposition: form-data; name="{name}"; filename="f"\r\n'
        ctype = draw(st.one_of(st.none(), content_types))
        if ctype is not None:
            head += f"Content-Type: {ctype}\r\n".replace("\r\n\r\n", "\r\n")
        if draw(st.booleans()):
            head += "Content-Transfer-Encoding: " + draw(st.sampled_from(["base64", "quoted-printable", "8bit", "x"])) + "\r\n"
        out += f"--{boundary}\r\n{head}\r\n".encode("utf-8", "replace") + draw(bodies) + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return out, f"multipart/form-data; boundary={boundary}"


def _pixels_or_refusal(decode, *args) -> None:
    try:
        pixels = decode(*args)
    except BadRequest as e:
        assert 400 <= e.code < 500 and e.message
        assert json.loads(e.body())["message"] == e.message
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 2 and pixels.shape[0] == pixels.shape[1]
    assert protocol.LIMITS["min_side"] <= pixels.shape[0] <= protocol.LIMITS["max_side"]


@MANY
@given(body=bodies, content_type=content_types)
def test_every_http_body_decodes_or_is_refused_with_a_4xx(body, content_type):
    _pixels_or_refusal(protocol.decode_http, body, content_type)


@SOME
@given(form=form_uploads())
def test_every_form_upload_decodes_or_is_refused_with_a_4xx(form):
    """A multipart upload (curl -F) of any shape: one image field decodes, anything else is a 4xx."""
    _pixels_or_refusal(protocol.decode_http, *form)


def test_a_form_upload_gives_the_pixels_of_its_image_whatever_the_field_is_called():
    import httpx

    img = data.raw_split("test", 1)[0][0]
    for name in ("data", "image", "file"):
        request = httpx.Request("POST", "http://127.0.0.1/", files={name: ("shirt.png", protocol.png_bytes(img), "image/png")})
        assert (protocol.decode_http(request.read(), request.headers["content-type"]) == img).all()
    two = httpx.Request("POST", "http://127.0.0.1/", data={"note": "x"}, files={"image": ("a.png", protocol.png_bytes(img))})
    with pytest.raises(BadRequest, match="exactly one field"):
        protocol.decode_http(two.read(), two.headers["content-type"])


@MANY
@given(value=st.one_of(json_values, bodies, st.text(max_size=200)))
def test_every_value_a_server_hands_over_decodes_or_is_refused_with_a_4xx(value):
    """TorchServe hands the handler parsed JSON, bytes or text: every one of them."""
    _pixels_or_refusal(protocol.decode_value, value)


header_values = st.one_of(content_types, st.integers(), st.lists(st.text(max_size=5), max_size=3), st.none())
events = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"body": st.one_of(st.text(max_size=300), st.none(), st.integers(), bodies.map(lambda b: b.decode("latin-1")))},
        optional={"headers": st.one_of(st.dictionaries(st.sampled_from(["content-type", "Content-Type", "x"]),
                                                       header_values, max_size=3),
                                       st.lists(st.text(max_size=5), max_size=3), st.text(max_size=10), st.integers()),
                  "isBase64Encoded": st.one_of(st.booleans(), st.text(max_size=3), st.none())},
    ),
)


@pytest.fixture(scope="module")
def function(onnx_path):
    serverless.configure(onnx_path, threads=1)
    yield serverless.handler
    serverless.configure(None)


@SOME
@given(event=events)
def test_every_event_gets_an_answer_never_an_exception(function, event):
    """The serverless function returns a 200 or a 4xx with a JSON message for any event a host may pass."""
    answer = function(event, None)
    assert answer["statusCode"] == 200 or 400 <= answer["statusCode"] < 500, answer
    body = json.loads(answer["body"])
    assert ("predictions" in body) if answer["statusCode"] == 200 else body["message"]
