"""The serverless handler: API-Gateway events in, JSON out; same validation as the servers; cold start."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploylab import data, export, onnxrt
from deploylab.serving import corpus, protocol, serverless


@pytest.fixture
def function(onnx_path):
    serverless.configure(onnx_path, threads=1)
    yield serverless.handler
    serverless.configure(None)


def test_png_and_pixel_events_match_in_process_onnxruntime(function, onnx_path):
    images, _ = data.raw_split("test", 16)
    sess, _ = export.load_exported(onnx_path, threads=1)
    reference = onnxrt.run(sess, data.preprocess(images)).argmax(1)
    for img, ref in zip(images, reference):
        for event in (serverless.event_from_image(protocol.png_bytes(img)), serverless.event_from_pixels(img)):
            answer = function(event, None)
            assert answer["statusCode"] == 200 and answer["headers"]["Content-Type"] == "application/json"
            body = json.loads(answer["body"])
            assert body["predictions"][0]["index"] == int(ref)
            assert len(body["predictions"]) == serverless.TOP_K
            assert 0.0 < body["predictions"][0]["probability"] <= 1.0


def test_bad_inputs_get_4xx_with_a_message(function):
    for case in corpus.bad_inputs():
        answer = function(serverless.event_from_body(case.body, case.content_type), None)
        code = answer["statusCode"]
        assert 400 <= code < 500, (case.name, code, answer["body"][:200])
        if case.expect is not None:
            assert code == case.expect, (case.name, code)
        assert json.loads(answer["body"])["message"], case.name


@pytest.mark.parametrize("event", [
    None, [], {"headers": {}}, {"body": 12}, {"body": "@@@", "isBase64Encoded": True},
    {"body": "[[1]]", "headers": ["content-type", "application/json"]},  # headers as a list
    {"body": "[[1]]", "headers": "application/json"},  # headers as a string
    {"body": "[[1]]", "headers": {"content-type": 7}},  # a header value that is not a string
    {"body": "[" * 50_000, "headers": {"content-type": "application/json"}},  # RecursionError in json.loads
    {"body": "[[" + "9" * 5_000 + "]]", "headers": {"content-type": "application/json"}},  # over 4,300 digits
    {"body": "\ud800", "headers": {}},  # a lone surrogate: valid in a JSON event, not in UTF-8
])
def test_malformed_events_are_4xx_never_an_exception(function, event):
    answer = function(event, None)
    assert 400 <= answer["statusCode"] < 500 and json.loads(answer["body"])["message"]


def test_unconfigured_function_says_how_to_configure():
    serverless.configure(None)
    images, _ = data.raw_split("test", 1)
    with pytest.raises(RuntimeError, match=serverless.MODEL_ENV):
        serverless.handler(serverless.event_from_image(protocol.png_bytes(images[0])), None)


def test_cold_start_in_fresh_processes(onnx_path):
    images, _ = data.raw_split("test", 1)
    sess, _ = export.load_exported(onnx_path, threads=1)
    ref = int(onnxrt.run(sess, data.preprocess(images)).argmax(1)[0])
    cs = serverless.cold_start(onnx_path, serverless.event_from_image(protocol.png_bytes(images[0])), repeats=2)
    assert cs.repeats == 2 and cs.statuses == [200, 200]
    assert all(a["predictions"][0]["index"] == ref for a in cs.answers)
    for phase in serverless.PHASES:
        assert all(v > 0 for v in cs.phases[phase]), phase
    total = np.array(cs.phases["total"])
    parts = sum(np.array(cs.phases[p]) for p in serverless.PHASES[:-1])
    assert np.allclose(total, parts, atol=1e-6)
    assert "onnxruntime" in cs.modules and "torch" in cs.modules
    sizes = serverless.install_bytes(serverless.distributions_of(cs.modules))
    assert sizes["onnxruntime"] > 1e6 and list(sizes.values()) == sorted(sizes.values(), reverse=True)


def test_a_form_upload_event_is_answered_like_the_raw_image(function):
    """A function URL receives a browser's form upload as a base64 multipart body: one field, any name."""
    import httpx

    png = protocol.png_bytes(data.raw_split("test", 1)[0][0])
    raw = function(serverless.event_from_image(png), None)
    request = httpx.Request("POST", "http://127.0.0.1/", files={"upload": ("shirt.png", png, "image/png")})
    form = function(serverless.event_from_body(request.read(), request.headers["content-type"]), None)
    assert raw["statusCode"] == 200 and form["statusCode"] == 200, form
    assert json.loads(form["body"]) == json.loads(raw["body"])


def test_the_function_serves_the_executorch_program_named_by_its_environment(program_path, monkeypatch):
    """DEPLOYLAB_RUNTIME=executorch with the INT8 program: the same top-1 as the program in process on real images;
    a runtime that cannot run the file is refused when configured."""
    from deploylab.serving import predictor

    images, _ = data.raw_split("test", 16)
    reference = predictor.load(program_path, threads=1).run(data.preprocess(images).numpy()).argmax(1)
    monkeypatch.setenv(serverless.MODEL_ENV, str(program_path))
    monkeypatch.setenv(serverless.RUNTIME_ENV, "executorch")
    monkeypatch.setenv(serverless.THREADS_ENV, "1")
    serverless._STATE.clear()
    try:
        got = [json.loads(serverless.handler(serverless.event_from_image(protocol.png_bytes(im)))["body"])["predictions"][0]["index"]
               for im in images]
        assert serverless.model().runtime == "executorch"
        assert got == reference.tolist()
        with pytest.raises(ValueError, match=".pte files need 'executorch'"):
            serverless.configure(program_path, runtime="onnxruntime")
    finally:
        serverless.configure(None)
