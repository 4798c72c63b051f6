"""The wire protocol's decoding at its edges: what a hostile client sends gets a 4xx, never another error."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from deploylab import data
from deploylab.serving import protocol
from deploylab.serving.protocol import BadRequest


@pytest.fixture(scope="module")
def images():
    return data.raw_split("test", 8)[0]


def _refused(fn, *args) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("body", [b"[" * 50_000, b"[[" + b"9" * 5_000 + b"]]", b'{"pixels": ' + b"[" * 50_000])
def test_json_that_breaks_the_parser_is_a_400_on_both_paths(body):
    """Deep nesting raises RecursionError and a 5,000-digit integer ValueError inside json.loads: both are 400s."""
    for err in (_refused(protocol.decode_value, body), _refused(protocol.decode_http, body, "application/json")):
        assert err.code == 400 and "JSON" in err.message


@pytest.mark.parametrize("value", [None, 2**64, "7", True])
def test_rectangular_arrays_of_non_pixels_are_refused_without_a_contradiction(value):
    """A 28x28 array of null, 2**64, strings or booleans: the message asks for integers and does not claim a
    wrong shape (it used to say "expected (H, H), got (28, 28)")."""
    err = _refused(protocol.decode_value, json.dumps([[value] * 28] * 28).encode())
    assert err.code == 400 and "integers 0..255" in err.message and "shape" not in err.message


def test_a_16_bit_png_decodes_to_the_pixels_of_its_8_bit_original(images):
    """Image.convert('L') clips 16-bit values at 255; the protocol scales them, so the model sees the same image."""
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.astype(np.uint16) * 257).save(buf, format="PNG")
        wide = Image.open(io.BytesIO(buf.getvalue()))
        assert wide.mode.startswith("I;16"), wide.mode  # really a 16-bit file
        np.testing.assert_array_equal(protocol.decode_value(buf.getvalue()), im)
        clipped = np.asarray(wide.convert("L"))
        assert not np.array_equal(clipped, im)  # what the old decoding answered with


def test_every_accepted_mode_gives_the_pixels_of_the_8_bit_image(images):
    im = images[0]
    modes = {"L": im, "RGB": np.stack([im] * 3, -1), "RGBA": np.dstack([im, im, im, np.full_like(im, 255)]),
             "LA": np.dstack([im, np.full_like(im, 255)])}
    for mode, arr in modes.items():
        for fmt in ("PNG",) if mode in ("RGBA", "LA") else ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.fromarray(arr, mode=mode).save(buf, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
            got = protocol.decode_value(buf.getvalue()).astype(int)
            tolerance = 0 if fmt == "PNG" else 8  # JPEG is lossy even at quality 100
            assert np.abs(got - im.astype(int)).max() <= tolerance, (mode, fmt)


def test_a_content_type_that_is_not_text_is_a_400():
    assert _refused(protocol.decode_http, b"[[1]]", 5).code == 400


def test_refusal_keeps_a_bad_request_and_logs_an_unforeseen_error(caplog):
    bad = BadRequest("too large", 413)
    assert protocol.refusal(bad) is bad
    with caplog.at_level(logging.WARNING, logger=protocol.__name__):
        made = protocol.refusal(ZeroDivisionError("boom"))
    assert made.code == 400 and "ZeroDivisionError" in made.message
    assert any("ZeroDivisionError" in r.getMessage() for r in caplog.records), "an unforeseen error must be logged"


def test_decoders_raise_only_bad_request(monkeypatch):
    """The boundary: whatever goes wrong inside a decoder reaches the server as a BadRequest."""
    def broken(raw, lim):
        raise KeyError("a bug the checks did not foresee")

    monkeypatch.setattr(protocol, "pixels_from_image", broken)
    err = _refused(protocol.decode_value, b"\x89PNG not really")
    assert err.code == 400 and "KeyError" in err.message


def test_bad_request_body_is_json_with_the_kind():
    body = json.loads(BadRequest("send PNG", 415).body())
    assert body == {"code": 415, "type": "UnsupportedMediaType", "message": "send PNG"}
    with pytest.raises(ValueError):
        BadRequest("not a client error", 500)
