"""Integration test: the real archive served by a real TorchServe (Java 17 + torchserve 0.12).

One server for the module (start-up takes seconds): parity with in-process ONNX Runtime on real
test images, the bad-input corpus, token authorization, the model API being off, and a stop that
leaves no process behind.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from deploylab import config, data, export, onnxrt
from deploylab.serving import corpus, load, protocol, torchserve

JAVA = torchserve.java_problem()
pytestmark = pytest.mark.skipif(JAVA is not None, reason=f"TorchServe cannot run here: {JAVA}")

MODEL = "student"
PT_MODEL = "student_pytorch"  # the same handler with backend: pytorch
ET_MODEL = "student_executorch"  # the same handler with backend: executorch (lesson 04b's INT8 program)


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_path, program_path):
    store = tmp_path_factory.mktemp("model-store")
    torchserve.build_archive(onnx_path, store, MODEL, torchserve.ModelConfig(batch_size=8, max_batch_delay_ms=5))
    checkpoint = config.artefacts_dir(config.get_profile()) / "student.pt"
    torchserve.build_archive(checkpoint, store, PT_MODEL, torchserve.ModelConfig(backend="pytorch", min_workers=1, max_workers=1))
    torchserve.build_archive(program_path, store, ET_MODEL, torchserve.ModelConfig(backend="executorch", min_workers=1, max_workers=1))
    ts = torchserve.TorchServe(store, {MODEL: f"{MODEL}.mar", PT_MODEL: f"{PT_MODEL}.mar", ET_MODEL: f"{ET_MODEL}.mar"},
                          workdir=tmp_path_factory.mktemp("torchserve"))
    with ts:
        yield ts
    # the context manager stopped it; test_stop_leaves_no_process checks the aftermath


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def test_served_top1_matches_onnxruntime(client, onnx_path, profile):
    n = torchserve.sizes(profile).parity_images
    images, labels = data.raw_split("test", n)
    assert len(images) >= min(200, profile.test_images or 10_000)
    sess, _ = export.load_exported(onnx_path, profile=profile)
    logits = onnxrt.run(sess, data.preprocess(images))
    result = load.served_parity(client, MODEL, images, logits.argmax(1), progress=False)
    assert result["statuses"] == {200: len(images)}
    assert result["agreement"] == 1.0, f"served top-1 differs from ONNX Runtime on {1 - result['agreement']:.1%} of images"
    # probabilities too, not only the arg-max (a smoke model may predict one class for everything)
    r = client.predict(MODEL, protocol.png_bytes(images[0]), "image/png").json()["predictions"]
    z = logits[0] - logits[0].max()
    probs = np.exp(z) / np.exp(z).sum()
    for p in r:
        assert p["label"] == data.CLASS_NAMES[p["index"]]
        assert abs(p["probability"] - probs[p["index"]]) < 1e-5


def test_pytorch_backend_agrees_with_onnxruntime(client, onnx_path, profile):
    images, _ = data.raw_split("test", 32)
    sess, _ = export.load_exported(onnx_path, profile=profile)
    reference = onnxrt.run(sess, data.preprocess(images)).argmax(1)
    result = load.served_parity(client, PT_MODEL, images, reference, progress=False)
    assert result["statuses"] == {200: 32} and result["agreement"] == 1.0


def test_executorch_backend_serves_the_program_like_in_process(client, program_path):
    """``backend: executorch``: the handler loads the .pte through predictor.load (card checked) and answers real
    test images with the program's top-1 in this process."""
    from deploylab.serving import predictor

    images, _ = data.raw_split("test", 32)
    reference = predictor.load(program_path, threads=1).run(data.preprocess(images).numpy()).argmax(1)
    result = load.served_parity(client, ET_MODEL, images, reference, progress=False)
    assert result["statuses"] == {200: 32} and result["agreement"] == 1.0


def test_json_pixels_give_the_same_answer_as_png(client):
    images, _ = data.raw_split("test", 3)
    for im in images:
        a = client.predict(MODEL, protocol.png_bytes(im), "image/png").json()
        b = client.predict(MODEL, im.tolist()).json()
        c = client.predict(MODEL, {"pixels": im.tolist()}).json()
        assert a == b == c


def test_bad_inputs_get_4xx_and_server_stays_healthy(server, client):
    pids_before = sorted(client.worker_pids(MODEL))
    rows = corpus.run_bad_inputs(client, MODEL, corpus.bad_inputs())
    wrong = [r for r in rows if not r["ok"]]
    assert not wrong, f"bad inputs without the expected 4xx: {wrong}"
    assert all(r["json"] for r in rows if r["answered by"] == "handler"), "every handler error must be JSON"
    assert client.ping()["status"] == "Healthy"
    assert sorted(client.worker_pids(MODEL)) == pids_before, "a worker died on bad input"
    image = data.raw_split("test", 1)[0][0]
    assert client.predict(MODEL, protocol.png_bytes(image), "image/png").status_code == 200


def test_one_bad_request_does_not_fail_its_batch(client):
    """Requests batched together: the bad one gets its 4xx, the good ones their answers."""
    from concurrent.futures import ThreadPoolExecutor

    good = protocol.png_bytes(data.raw_split("test", 1)[0][0])
    bodies = [good, b"not an image"] * 8
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda b: client.predict(MODEL, b, "application/octet-stream").status_code, bodies))
    assert statuses == [200, 415] * 8


def test_requests_without_or_with_a_wrong_token_are_refused(server):
    image = protocol.png_bytes(data.raw_split("test", 1)[0][0])
    url = f"{server.url('inference')}/predictions/{MODEL}"
    no_token = httpx.post(url, content=image)
    wrong = httpx.post(url, content=image, headers={"Authorization": "Bearer not-the-key"})
    assert no_token.status_code in (400, 401, 403) and wrong.status_code in (400, 401, 403)
    mgmt = httpx.get(f"{server.url('management')}/models/{MODEL}")
    assert mgmt.status_code in (400, 401, 403)


def test_exactly_the_documented_endpoints_answer_without_a_key(server):
    """torchserve.OPEN_ENDPOINTS (lesson 05 and the README's security notes list them) answer without
    a key; predictions, ping and describing a model do not."""
    for method, api, path in torchserve.OPEN_ENDPOINTS:
        r = httpx.request(method, f"{server.url(api)}{path}", trust_env=False)
        assert r.status_code == 200, (method, api, path, r.status_code)
    image = protocol.png_bytes(data.raw_split("test", 1)[0][0])
    for method, api, path in [("GET", "inference", "/ping"), ("POST", "inference", f"/predictions/{MODEL}"),
                              ("PUT", "inference", f"/predictions/{MODEL}"), ("DELETE", "inference", f"/predictions/{MODEL}"),
                              ("GET", "management", "/models"), ("GET", "management", f"/models/{MODEL}")]:
        r = httpx.request(method, f"{server.url(api)}{path}", content=image if method in ("POST", "PUT") else None,
                          trust_env=False)
        assert r.status_code in (400, 401, 403), (method, api, path, r.status_code)


def test_a_form_upload_is_answered_like_the_raw_image(server, client):
    """curl -F image=@shirt.png: TorchServe's frontend unpacks the form; the handler takes its one field, any name."""
    png = protocol.png_bytes(data.raw_split("test", 1)[0][0])
    raw = client.predict(MODEL, png, "image/png")
    url = f"{server.url('inference')}/predictions/{MODEL}"
    for name in ("image", "data"):
        form = client.http.post(url, files={name: ("shirt.png", png, "image/png")}, headers=client._inference_headers)
        assert form.status_code == 200 and form.json() == raw.json(), (name, form.status_code, form.text[:200])


def test_model_management_api_is_off_and_addresses_are_loopback(server, client):
    r = client.http.post(f"{server.url('management')}/models", params={"url": f"{MODEL}.mar"},
                         headers=client._management_headers)
    assert r.status_code == 405
    text = server.config_file.read_text()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert f"{key}=http://127.0.0.1:" in text


def test_roles_name_the_frontend_and_every_worker(server, client):
    """Lesson 05 accounts CPU time to these roles: one Java frontend, a worker per configured worker, the launcher."""
    roles = server.roles()
    workers = {w["pid"] for m in (MODEL, PT_MODEL, ET_MODEL) for w in client.describe(m)["workers"]}
    assert [p.name() for p in roles["frontend"]] == ["java"]
    assert {p.pid for p in roles["workers"]} == workers and len(workers) >= 2
    assert sum(len(ps) for ps in roles.values()) == len(server.processes())


def test_stop_leaves_no_process(server):
    """Runs last: stops the module's server and checks that nothing of it is left."""
    procs = server.processes()
    assert len(procs) >= 5  # the torchserve launcher, java, three workers
    port = server.ports["inference"]
    server.stop()
    assert server.processes() == []
    assert not any(p.is_running() and p.status() != "zombie" for p in procs)
    assert not server.key_file.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2)
