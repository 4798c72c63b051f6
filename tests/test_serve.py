"""Unit tests of deploylab.serving (protocol, TorchServe set-up, client, corpus) and the handler's decoding: no server needed."""

from __future__ import annotations

import importlib.util
import json
import socket
import zipfile

import numpy as np
import pytest
import yaml

from deploylab import config, data
from deploylab.serving import api, corpus, load, processes, protocol, torchserve


@pytest.fixture(scope="module")
def handler_module():
    pytest.importorskip("ts", reason="torchserve is not installed: pip install -e .[serve]")
    spec = importlib.util.spec_from_file_location("deploylab_handler", torchserve.HANDLER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def limits(handler_module):
    return dict(handler_module.DEFAULTS)


def test_sizes_exist_for_every_profile_and_parity_covers_200_images():
    for name, p in config.PROFILES.items():
        s = torchserve.sizes(p)
        assert s.concurrency == (1, 8, 32)
        n = s.parity_images or p.test_images or 10_000
        assert n >= min(200, p.test_images or 10_000), name


def test_handler_file_defines_exactly_one_class(handler_module):
    """TorchServe's loader refuses a handler module with more than one class of its own."""
    import inspect

    own = [c for _, c in inspect.getmembers(handler_module, inspect.isclass) if c.__module__ == handler_module.__name__]
    assert [c.__name__ for c in own] == ["DeploylabHandler"]


def test_one_request_that_breaks_the_parser_fails_alone_in_its_batch(handler_module, limits):
    """A body that makes json.loads raise RecursionError shares a batch with valid requests: only it fails."""
    images, _ = data.raw_split("test", 2)
    handler = handler_module.DeploylabHandler()
    handler.cfg = dict(limits)
    batch = [{"body": protocol.png_bytes(images[0])}, {"body": b"[" * 50_000}, {"data": protocol.png_bytes(images[1])}]
    x, errors = handler.preprocess(batch)
    assert x.shape[0] == 2 and errors[0] is None and errors[2] is None
    assert isinstance(errors[1], protocol.BadRequest) and errors[1].code == 400 and "JSON" in errors[1].message


def test_decode_png_and_json_give_the_same_real_pixels(handler_module, limits):
    images, _ = data.raw_split("test", 4)
    for im in images:
        from_png = handler_module.decode({"body": protocol.png_bytes(im)}, limits)
        from_list = handler_module.decode({"body": im.tolist()}, limits)  # TorchServe parsed the JSON already
        from_bytes = handler_module.decode({"data": json.dumps({"pixels": im.tolist()}).encode()}, limits)
        np.testing.assert_array_equal(from_png, im)
        np.testing.assert_array_equal(from_list, im)
        np.testing.assert_array_equal(from_bytes, im)
    # and the handler's preprocessing is the training code's
    x = data.preprocess(handler_module.decode({"body": protocol.png_bytes(images[0])}, limits))
    np.testing.assert_array_equal(x.numpy(), data.preprocess(images[:1]).numpy())


def test_every_bad_input_of_the_corpus_is_refused_by_the_handler(handler_module, limits):
    cases = corpus.bad_inputs()
    assert len(cases) >= 20
    for case in cases:
        body = json.loads(case.body) if case.content_type == "application/json" and _is_json(case.body) else case.body
        with pytest.raises(protocol.BadRequest) as err:
            handler_module.decode({"body": body}, limits)
        assert 400 <= err.value.code < 500, case.name
        if case.expect is not None:
            assert err.value.code == case.expect, case.name
        msg = json.loads(err.value.body())
        assert msg["code"] == err.value.code and len(msg["message"]) > 10, case.name


def _is_json(raw: bytes) -> bool:
    """Whether TorchServe's worker would hand this body over parsed: it tries json.loads and, on any
    exception (a RecursionError included), forwards the raw bytes instead."""
    try:
        json.loads(raw)
        return True
    except Exception:
        return False


def test_bad_request_is_always_4xx():
    with pytest.raises(ValueError):
        protocol.BadRequest("server fault", 500)
    assert json.loads(protocol.BadRequest("too big", 413).body())["type"] == "PayloadTooLarge"


def test_model_config_yaml_has_torchserve_keys_and_refuses_nonsense():
    d = torchserve.ModelConfig(batch_size=8, max_batch_delay_ms=5, min_workers=1, max_workers=3).to_yaml_dict()
    assert (d["batchSize"], d["maxBatchDelay"], d["minWorkers"], d["maxWorkers"]) == (8, 5, 1, 3)
    assert d["responseTimeout"] > 0 and d["handler"]["backend"] == "onnx"
    bad_configs = (torchserve.ModelConfig(batch_size=0), torchserve.ModelConfig(min_workers=3, max_workers=2),
                   torchserve.ModelConfig(backend="tf"))
    for bad in bad_configs:
        with pytest.raises(ValueError):
            bad.to_yaml_dict()


def test_config_properties_are_secure_by_default(tmp_path):
    ports = dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management", "worker_base"), range(9000, 9006)))
    props = dict(line.split("=", 1) for line in torchserve.config_properties(ports, tmp_path).splitlines())
    for name in ("inference", "management", "metrics"):
        assert props[f"{name}_address"] == f"http://127.0.0.1:{ports[name]}"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"


def test_free_ports_are_distinct_and_bindable():
    ports = processes.free_ports(4)
    assert len(set(ports)) == 4
    s = socket.socket()
    s.bind(("127.0.0.1", ports[0]))
    s.close()


def test_client_refuses_non_loopback_addresses():
    with pytest.raises(ValueError, match="loopback"):
        api.Client("http://0.0.0.0:8080", "http://127.0.0.1:1", "http://127.0.0.1:2", inference_key="a", management_key="b")


def test_parse_prometheus():
    text = ('# HELP ts_inference_requests_total Total\n# TYPE ts_inference_requests_total counter\n'
            'ts_inference_requests_total{model_name="student",model_version="default",hostname="vm",} 42.0\n'
            'Requests4XX{Level="Host",Hostname="vm",} 3.0\nup 1\n')
    samples = api.parse_prometheus(text)
    assert samples[0] == ("ts_inference_requests_total", {"model_name": "student", "model_version": "default", "hostname": "vm"}, 42.0)
    assert samples[1][2] == 3.0 and samples[2] == ("up", {}, 1.0)


def test_png_bytes_roundtrip_and_type_check():
    import io

    from PIL import Image

    im = data.raw_split("test", 1)[0][0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(protocol.png_bytes(im)))), im)
    with pytest.raises(TypeError):
        protocol.png_bytes(im.astype(np.float32))


def test_test_images_are_the_ones_data_tensors_uses():
    images, labels = data.raw_split("test", 16)
    x, y = data.tensors("test", 16)
    np.testing.assert_array_equal(data.preprocess(images).numpy(), x.numpy())
    np.testing.assert_array_equal(labels, y.numpy())


def test_load_result_summary():
    r = load.LoadResult("m", 8, 4, 2.0, {200: 3, 503: 1}, [10.0, 20.0, 30.0, 40.0], [(0, 200), (0.1, 200), (0.2, 503), (0.3, 200)])
    assert r.ok == 3 and r.errors_5xx == 1 and r.throughput == 1.5
    s = r.summary()
    assert s["p50 ms"] == 25.0 and s["5xx"] == 1


def test_build_archive_ships_model_card_labels_and_config(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really onnx, the archiver only copies it")
    with pytest.raises(processes.ServeError, match="card"):
        torchserve.build_archive(onnx, tmp_path / "store", "m")
    onnx.with_suffix(".card.json").write_text("{}")
    mar = torchserve.build_archive(onnx, tmp_path / "store", "m", torchserve.ModelConfig(batch_size=4))
    names = torchserve.archive_contents(mar)
    for f in ("m.onnx", "m.card.json", "index_to_name.json", "model-config.yaml", "deploylab_handler.py", "MAR-INF/MANIFEST.json"):
        assert f in names
    with zipfile.ZipFile(mar) as z:
        assert yaml.safe_load(z.read("model-config.yaml"))["batchSize"] == 4
        assert json.loads(z.read("index_to_name.json"))["9"] == "Ankle boot"
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["handler"] == "deploylab_handler.py"


def test_java_problem_names_the_package_when_java_is_missing(monkeypatch):
    monkeypatch.setenv("JAVA_HOME", "/nonexistent")
    assert "openjdk-17-jre-headless" in torchserve.java_problem()
