"""Integration test: build the serving image (cached layers reused), run it with the lesson's secure
defaults, and check health, parity with in-process ONNX Runtime on real test images, token
authorization, the bad-input corpus, and that no container is left.

The engine is started here when ``dockerd`` is installed and we are root; the debootstrap stand-in
for ``debian:bookworm-slim`` (``deploylab-debian:bookworm-slim``) is built when it is missing. Torch comes from the CPU wheel index
unless ``DEPLOYLAB_WHEELS`` names a folder of wheels (``/opt/wheels`` is used when it holds a torch
wheel), and ``DEPLOYLAB_CERTS`` (default: the machine's CA bundle, when present) is trusted during
the build -- what a machine behind a TLS-intercepting proxy needs.
"""

from __future__ import annotations

import httpx
import pytest

from deploylab import data
from deploylab.serving import api, container, corpus, docker_build, engine, protocol

ENGINE = engine.ensure_engine()
pytestmark = pytest.mark.skipif(ENGINE is not None, reason=f"no Docker engine can be started here: {ENGINE}")


@pytest.fixture(scope="module")
def image(serve_image):
    built = serve_image  # staged and built in conftest.py, once per session (test_proxy_integration runs it too)
    assert built.size_bytes > 100e6 and built.image_id
    print(f"image {built.tag}: {built.size_bytes / 1e9:.2f} GB, built in {built.seconds:.0f} s "
          f"({built.cached_steps}/{built.steps} steps cached)")
    return built


@pytest.fixture(scope="module")
def running(image, profile):
    before = set(container.leftovers())
    c = container.Container(image.tag, memory=container.sizes(profile).memory)
    with c:
        ready = c.wait_ready(container.sizes(profile).healthy_timeout_s)
        healthy = c.wait_healthy(container.sizes(profile).healthy_timeout_s)
        print(f"answering after {ready:.1f} s, healthy after {healthy:.1f} s (target < {container.TARGETS.healthy_s:.0f} s)")
        yield c
    assert set(container.leftovers()) <= before, "the test's container was not removed"


@pytest.fixture(scope="module")
def client(running):
    with running.client() as c:
        yield c


def test_image_carries_no_training_stack(image):
    v = docker_build.image_versions(image.tag)
    assert v["torchvision"] == "absent"
    assert v["python"].startswith("3.11") and "17" in v["java"]
    assert "+cpu" in v["torch"] or v["torch"]  # a CPU build: the Dockerfile refuses a CUDA one


def test_container_is_healthy_read_only_and_not_root(running):
    assert running.health() == "healthy"
    info = running.inspect()
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert info["Config"]["User"].split(":")[0] == str(container.USER_ID)
    published = info["NetworkSettings"]["Ports"]
    assert set(published) == {f"{container.INFERENCE_PORT}/tcp"}  # not the metrics port: it answers without a key
    assert all(b["HostIp"] == "127.0.0.1" for bindings in published.values() for b in bindings)
    assert running.exec("id", "-u").strip() == str(container.USER_ID)
    assert api.parse_prometheus(running.scrape_metrics()), "no metrics inside the container"
    with pytest.raises(engine.ContainerError):
        running.exec("touch", "/app/written")  # read-only root filesystem


def test_served_predictions_match_onnxruntime(client, onnx_path, profile):
    result = container.parity(client, onnx_path, profile, container.sizes(profile).parity_images)
    assert result["images"] >= min(100, profile.test_images or 10_000)
    assert result["statuses"] == {200: result["images"]}
    assert result["agreement"] == 1.0, f"served top-1 differs from ONNX Runtime on {1 - result['agreement']:.1%} of images"
    assert result["labels_match"] and result["max_prob_diff"] < 1e-5


def test_requests_without_or_with_a_wrong_token_are_refused(running):
    image = protocol.png_bytes(data.raw_split("test", 1)[0][0])
    url = f"{running.url()}/predictions/{docker_build.MODEL}"
    assert httpx.post(url, content=image, trust_env=False).status_code in (400, 401, 403)
    wrong = httpx.post(url, content=image, headers={"Authorization": "Bearer guess"}, trust_env=False)
    assert wrong.status_code in (400, 401, 403)


def test_bad_inputs_get_4xx_and_the_container_stays_healthy(running, client):
    rows = corpus.run_bad_inputs(client, docker_build.MODEL, corpus.bad_inputs())
    wrong = [r for r in rows if not r["ok"]]
    assert not wrong, f"bad inputs without the expected 4xx: {wrong}"
    assert client.ping()["status"] == "Healthy"
    assert client.top1(docker_build.MODEL, data.raw_split("test", 1)[0][0]) in range(10)
    assert running.health() == "healthy"


def test_remove_leaves_no_container(image):
    c = container.Container(image.tag).start()
    cid = c.cid
    c.remove()
    assert cid not in " ".join(container.leftovers())
    assert engine.docker("ps", "-aq", "--no-trunc", "--filter", f"id={cid}").stdout.strip() == ""
