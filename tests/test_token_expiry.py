"""Keys that outlive their hour: a real TorchServe whose keys expire, crossed by a client and the health check.

TorchServe 0.12's inference and management keys expire after ``token_expiration_min`` (60 minutes
by default; only the API key does not). Measured last round: the lesson-06 container turned
unhealthy at the 60th minute, and a client holding the key printed at start got 400. Here the
lifetime is 0.2 minutes (TorchServe reads the setting as a fraction of minutes), so that three
expiries pass in well under a minute of the test suite; the code paths are those of the hour:

- a client alone renews its key itself with the API key (``TorchServe.renewed_tokens``);
- the image's health check (``docker/healthcheck.py``, run as Docker runs it) renews the keys before
  they expire and stays healthy, and a client whose key the health check replaced re-reads it;
- a client that never renews is refused once its key has expired (so the test can fail).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from deploylab import config, data, export, onnxrt
from deploylab.serving import api, torchserve

JAVA = torchserve.java_problem()
pytestmark = pytest.mark.skipif(JAVA is not None, reason=f"TorchServe cannot run here: {JAVA}")

MODEL = "student"
LIFETIME_MIN = 0.2  # 12 s: three expiries in about 40 s (the health check renews 4 s before expiry, checked every ~1 s)
HEALTHCHECK = config.ROOT / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_path):
    store = tmp_path_factory.mktemp("model-store")
    torchserve.build_archive(onnx_path, store, MODEL, torchserve.ModelConfig(min_workers=1, max_workers=1))
    ts = torchserve.TorchServe(store, {MODEL: f"{MODEL}.mar"}, workdir=tmp_path_factory.mktemp("torchserve"),
                               token_expiration_min=LIFETIME_MIN)
    with ts:
        yield ts


@pytest.fixture(scope="module")
def images_and_expected(onnx_path, profile):
    images, _ = data.raw_split("test", 8)
    sess, _ = export.load_exported(onnx_path, profile=profile)
    return images, onnxrt.run(sess, data.preprocess(images)).argmax(1)


def _health(server: torchserve.TorchServe) -> subprocess.CompletedProcess:
    """The image's health check, pointed at this server (the container's paths and ports are its defaults)."""
    return subprocess.run([sys.executable, str(HEALTHCHECK), "--key-file", str(server.key_file),
                           "--inference", server.url("inference"), "--management", server.url("management"),
                           "--config", str(server.config_file), "--renew-before-s", "4"],
                          capture_output=True, text=True, timeout=30)


def test_a_client_renews_its_own_expired_key(server, images_and_expected):
    images, expected = images_and_expected
    first = server.tokens()["inference"]
    deadline = time.monotonic() + LIFETIME_MIN * 60 * 2 + 20
    with server.client() as client:
        i = 0
        while server.tokens()["inference"] == first:
            assert time.monotonic() < deadline, "the inference key was never renewed"
            assert client.top1(MODEL, images[i % len(images)]) == expected[i % len(images)]
            i += 1
            time.sleep(0.5)
        assert client.renewals >= 1
        assert client.top1(MODEL, images[0]) == expected[0]


def test_health_check_and_client_stay_healthy_across_two_expiries(server, images_and_expected):
    images, expected = images_and_expected
    keys = server.tokens()
    stale = api.Client(server.url("inference"), server.url("management"), server.url("metrics"),
                       inference_key=keys["inference"], management_key=keys["management"])  # never renews
    seen = {keys["inference"]}
    checks = 0
    deadline = time.monotonic() + LIFETIME_MIN * 60 * 3 + 30
    with server.client() as client, stale:
        while len(seen) < 3:  # the key of the start, then two renewals
            assert time.monotonic() < deadline, f"only {len(seen) - 1} renewals in {LIFETIME_MIN * 180 + 30:.0f} s"
            h = _health(server)
            assert h.returncode == 0 and h.stdout.strip() == "healthy", (h.returncode, h.stdout, h.stderr)
            checks += 1
            i = checks % len(images)
            assert client.top1(MODEL, images[i]) == expected[i]
            seen.add(server.tokens()["inference"])
            time.sleep(0.5)
        refused = stale.predict(MODEL, b"", "image/png")
        assert api.token_refused(refused), f"an expired key was accepted: {refused.status_code} {refused.text[:200]}"
    assert client.renewals >= 2, "the client never had to re-read a key that the health check replaced"
    assert checks >= 10
