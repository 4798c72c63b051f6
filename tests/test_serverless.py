"""The serverless handler: API-Gateway events in, JSON out; same validation as the servers; cold start."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploylab import data, export, serve, serverless


@pytest.fixture
def function(onnx_path):
    serverless.configure(onnx_path, threads=1)
    yield serverless.handler
    serverless.configure(None)


def test_png_and_pixel_events_match_in_process_onnxruntime(function, onnx_path):
    images, _ = serve.test_images(16)
    sess, _ = export.load_exported(onnx_path, threads=1)
    reference = export.run(sess, data.preprocess(images)).argmax(1)
    for img, ref in zip(images, reference):
        for event in (serverless.event_from_image(serve.png_bytes(img)), serverless.event_from_pixels(img)):
            answer = function(event, None)
            assert answer["statusCode"] == 200 and answer["headers"]["Content-Type"] == "application/json"
            body = json.loads(answer["body"])
            assert body["predictions"][0]["index"] == int(ref)
            assert len(body["predictions"]) == serverless.TOP_K
            assert 0.0 < body["predictions"][0]["probability"] <= 1.0


def test_bad_inputs_get_4xx_with_a_message(function):
    for case in serve.bad_inputs():
        answer = function(serverless.event_from_body(case.body, case.content_type), None)
        code = answer["statusCode"]
        assert 400 <= code < 500, (case.name, code, answer["body"][:200])
        if case.expect is not None:
            assert code == case.expect, (case.name, code)
        assert json.loads(answer["body"])["message"], case.name


@pytest.mark.parametrize("event", [None, [], {"headers": {}}, {"body": 12}, {"body": "@@@", "isBase64Encoded": True}])
def test_malformed_events_are_4xx(function, event):
    assert 400 <= function(event, None)["statusCode"] < 500


def test_unconfigured_function_says_how_to_configure():
    serverless.configure(None)
    images, _ = serve.test_images(1)
    with pytest.raises(RuntimeError, match=serverless.MODEL_ENV):
        serverless.handler(serverless.event_from_image(serve.png_bytes(images[0])), None)


def test_cold_start_in_fresh_processes(onnx_path):
    images, _ = serve.test_images(1)
    sess, _ = export.load_exported(onnx_path, threads=1)
    ref = int(export.run(sess, data.preprocess(images)).argmax(1)[0])
    cs = serverless.cold_start(onnx_path, serverless.event_from_image(serve.png_bytes(images[0])), repeats=2)
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
