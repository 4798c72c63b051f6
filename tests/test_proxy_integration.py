"""Integration test: lesson 06's stack from docker/compose.yaml -- real nginx (TLS) in front of a real
TorchServe container on an internal network -- driven through the proxy the way a hostile client
would: half-sent requests closed within the proxy's timeout, TorchServe's open endpoints gone, the
request-smuggling shapes refused, overload answered with 429 and Retry-After, no key refused, and
a valid request answered like in-process ONNX Runtime. The malformed requests go as raw bytes over
``ssl``-wrapped sockets; the valid ones with httpx, verifying the certificate against the test's CA.

The serving image is the session's ``serve_image`` (tests/conftest.py), built once for this module and
tests/test_docker_integration.py; the proxy's image is ~15 MB of nginx-light on the same base.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import ssl
import threading
import time

import httpx
import pytest

from deploylab import data, export, onnxrt
from deploylab.serving import engine, processes, protocol, proxy

ENGINE = engine.ensure_engine()
pytestmark = [
    pytest.mark.skipif(ENGINE is not None, reason=f"no Docker engine can be started here: {ENGINE}"),
    pytest.mark.skipif(proxy.shutil.which("docker-compose") is None, reason="docker-compose is not installed (make setup)"),
]
TIMEOUT_S = 5.0  # client_header_timeout and client_body_timeout in docker/nginx.conf


@pytest.fixture(scope="module")
def stack(profile, serve_image, tmp_path_factory):
    built = proxy.build_proxy_image(progress=False)  # on the base image serve_image (conftest.py) ensured
    print(f"proxy image {built.size_bytes / 1e6:.0f} MB ({built.cached_steps}/{built.steps} steps cached)")
    s = proxy.Stack(proxy.make_secrets(tmp_path_factory.mktemp("proxy")), image_tag=profile.name)
    with s:
        print(f"stack healthy after {s.wait_healthy():.1f} s")
        yield s
    left = engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={s.project}").stdout.strip()
    assert not left, "compose left containers"


@pytest.fixture(scope="module")
def expected(onnx_path, profile):
    """Eight real test images (PNG) and in-process ONNX Runtime's top-1 for each."""
    images, _ = data.raw_split("test", 8)
    sess, _ = export.load_exported(onnx_path, profile=profile)
    logits = onnxrt.run(sess, data.preprocess(images))
    return [protocol.png_bytes(im) for im in images], logits.argmax(1).tolist(), logits


def _raw(stack, request: bytes, wait_s: float = 10.0) -> proxy.RawResult:
    return proxy.raw_exchange(stack.port, request, stack.secrets.ca, wait_s=wait_s)


def _post(stack, body: bytes, headers: bytes = b"", key: bool = True) -> bytes:
    auth = b"Authorization: Bearer " + stack.secrets.key.encode() + b"\r\n" if key else b""
    return b"POST " + proxy.PREDICT.encode() + b" HTTP/1.1\r\nHost: localhost\r\n" + auth + headers + b"\r\n" + body


def test_only_the_proxy_is_published_and_both_containers_are_locked_down(stack):
    serve, front = stack.inspect("serve"), stack.inspect("proxy")
    assert not any(serve["NetworkSettings"]["Ports"].values()), "TorchServe's ports must be published nowhere"
    (net,) = serve["NetworkSettings"]["Networks"]
    assert engine.docker("network", "inspect", "--format", "{{.Internal}}", net).stdout.strip() == "true"
    bindings = [b for binds in front["HostConfig"]["PortBindings"].values() for b in binds]
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
    for info in (serve, front):
        assert info["HostConfig"]["ReadonlyRootfs"] is True and info["HostConfig"]["CapDrop"] == ["ALL"]
        assert info["Config"]["User"].split(":")[0] in ("10001", "10002")
    assert serve["Config"]["Cmd"][-1] == "/app/config-behind-proxy.properties"
    assert "TS_CONFIG_FILE=/app/config-behind-proxy.properties" in serve["Config"]["Env"]


def test_a_valid_request_is_answered_like_onnxruntime(stack, expected):
    pngs, top1, logits = expected
    with stack.client() as c:
        answers = [c.post(proxy.PREDICT, content=png) for png in pngs]
        assert c.get("/ping").json()["status"] == "Healthy"
    assert [a.status_code for a in answers] == [200] * len(pngs)
    assert [a.json()["predictions"][0]["index"] for a in answers] == top1
    served = {p["index"]: p["probability"] for p in answers[0].json()["predictions"]}
    probs = protocol.top_k(logits[:1], k=len(data.CLASS_NAMES))[0]["predictions"]
    assert max(abs(served[p["index"]] - p["probability"]) for p in probs if p["index"] in served) < 1e-5


def test_a_chunked_upload_is_reframed_and_answered(stack, expected):
    """A well-formed chunked body (no Content-Length) is fine: nginx reads it and sends TorchServe a
    Content-Length; only the ambiguous shapes below are refused."""
    png = expected[0][0]
    chunked = b"%x\r\n" % len(png) + png + b"\r\n0\r\n\r\n"
    r = _raw(stack, _post(stack, chunked, b"Transfer-Encoding: chunked\r\nConnection: close\r\n"))
    assert r.statuses == [200] and json.loads(r.answers[0].body)["predictions"][0]["index"] == expected[1][0]


def test_without_or_with_a_wrong_key_is_refused(stack, expected):
    png = expected[0][0]
    for key in (None, "guess", stack.secrets.key[:-1]):
        with stack.client(key=key) as c:
            r = c.post(proxy.PREDICT, content=png)
        assert r.status_code == 401 and "bearer key" in r.json()["message"]


def test_torchserves_open_endpoints_are_gone(stack):
    with stack.client() as c:  # with the key: a 404 here is the proxy's, not a missing token
        assert c.options("/").status_code == 404
        assert c.get("/api-description").status_code == 404
        assert c.get("/metrics").status_code == 404
        assert c.get("/models").status_code == 404
        assert c.get(proxy.PREDICT).status_code == 405


def test_half_sent_and_trickled_requests_are_closed_within_the_timeout(stack):
    """Each probe on its own connection, all at once: nothing sent after the TLS handshake, half a
    request line, headers without their end, a body shorter than its Content-Length, and headers
    trickled one byte every 0.5 s (client_header_timeout is a deadline, not an idle timer)."""
    half = {
        "nothing": b"",
        "half request line": b"POST /predictions/stu",
        "headers unfinished": b"POST /predictions/student HTTP/1.1\r\nHost: localhost\r\n",
        "body short": _post(stack, b"0123456789", b"Content-Length: 1000\r\n"),
    }

    def trickle() -> tuple[bool, float]:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", stack.port), timeout=15) as raw, \
                proxy.tls_context(stack.secrets.ca).wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"POST /predictions/student HTTP/1.1\r\n")
            s.settimeout(0.5)
            while time.perf_counter() - t0 < 15:
                try:
                    s.sendall(b"X")
                    if s.recv(1024) == b"":
                        return True, time.perf_counter() - t0
                except (TimeoutError, socket.timeout):
                    continue
                except (OSError, ssl.SSLError):
                    return True, time.perf_counter() - t0
        return False, time.perf_counter() - t0

    with cf.ThreadPoolExecutor(len(half) + 1) as pool:
        futures = {name: pool.submit(_raw, stack, req, 15.0) for name, req in half.items()}
        trickled = pool.submit(trickle)
        results = {name: f.result() for name, f in futures.items()}
        closed, seconds = trickled.result()
    for name, r in results.items():
        assert r.closed and r.seconds < TIMEOUT_S + 3, f"{name}: still open after {r.seconds:.1f} s"
        assert r.statuses in ([], [408], [400]), f"{name}: {r.statuses}"
    assert closed and seconds < TIMEOUT_S + 3, f"trickled headers: still open after {seconds:.1f} s"


def test_request_smuggling_shapes_are_refused(stack, expected):
    """Content-Length plus Transfer-Encoding, obfuscated Transfer-Encoding values, a negative
    Content-Length: one refusal each (400, or 501 for a transfer coding nginx does not implement, as
    RFC 9112 section 6.1 asks), the connection closed, and no answer to the request hidden in the body."""
    smuggled = b"GET /api-description HTTP/1.1\r\nHost: localhost\r\n\r\n"
    chunked_body = b"0\r\n\r\n" + smuggled
    cases = {
        "CL + TE chunked": _post(stack, chunked_body, b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(chunked_body)),
        "TE chunked, identity": _post(stack, chunked_body, b"Transfer-Encoding: chunked, identity\r\n"),
        "TE chunked + vertical tab": _post(stack, chunked_body, b"Transfer-Encoding: chunked\x0b\r\n"),
        "Content-Length -5": _post(stack, b"\r\n" + smuggled, b"Content-Length: -5\r\n"),
        "two Content-Length": _post(stack, expected[0][0], b"Content-Length: 5\r\nContent-Length: %d\r\n" % len(expected[0][0])),
    }
    for name, request in cases.items():
        r = _raw(stack, request)
        assert len(r.statuses) == 1 and r.statuses[0] in (400, 501), f"{name}: {r.statuses} {r.data[:200]!r}"
        assert r.closed, f"{name}: the connection stayed open after the refusal"


def test_oversized_headers_and_bodies_are_refused(stack):
    r = proxy.raw_exchange(stack.port, _post(stack, b"", b"X-Padding: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n"),
                           stack.secrets.ca, answers=1)
    assert r.statuses == [400], r.data[:200]
    r = proxy.raw_exchange(stack.port, _post(stack, b"", b"Content-Length: 2000000\r\n"), stack.secrets.ca, answers=1)
    assert r.statuses == [413], r.data[:200]  # refused before any body is sent


def test_pipelined_requests_get_their_own_answers_in_order(stack, expected):
    """TorchServe mixed up pipelined answers; through nginx each upstream connection carries one
    request at a time, so three pipelined requests get their three answers, in order."""
    (png_a, png_b), (top_a, top_b) = expected[0][:2], expected[1][:2]
    ping = b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n"
    last = _post(stack, png_b, b"Content-Length: %d\r\nConnection: close\r\n" % len(png_b))
    r = _raw(stack, ping + _post(stack, png_a, b"Content-Length: %d\r\n" % len(png_a)) + last)
    assert r.statuses == [200, 200, 200]
    answers = [json.loads(a.body) for a in r.answers]
    assert answers[0]["status"] == "Healthy"
    assert [answers[1]["predictions"][0]["index"], answers[2]["predictions"][0]["index"]] == [top_a, top_b]


def test_overload_is_answered_429_with_retry_after(stack, expected):
    """300 requests from 40 threads at once: more connections than the 32 one client may keep busy
    and more requests than the burst of 50 plus 100/s (whatever TorchServe's speed on this machine),
    so some are refused at the door with 429 and Retry-After; none fails otherwise, and a request
    after the Retry-After delay is served again."""
    png = expected[0][0]
    local = threading.local()

    def one(_: int) -> httpx.Response:
        if not hasattr(local, "client"):
            local.client = stack.client()
        return local.client.post(proxy.PREDICT, content=png)

    with cf.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(one, range(300)))
    codes = [a.status_code for a in answers]
    refused = [a for a in answers if a.status_code == 429]
    assert set(codes) <= {200, 429} and refused and codes.count(200) >= 25, {c: codes.count(c) for c in set(codes)}
    assert all(a.headers.get("retry-after") == "1" for a in refused)
    assert all("retry-after" not in a.headers for a in answers if a.status_code == 200)
    time.sleep(float(refused[0].headers["retry-after"]))
    with stack.client() as c:
        assert c.post(proxy.PREDICT, content=png).status_code == 200


def test_down_leaves_nothing(stack):
    """The fixture's teardown checks the containers; here: the networks are the project's own."""
    nets = engine.docker("network", "ls", "--format", "{{.Name}}", "--filter", f"label=com.docker.compose.project={stack.project}")
    assert sorted(nets.stdout.split()) == sorted(f"{stack.project}_{n}" for n in ("backend", "frontend"))
    assert processes.port_in_use(stack.port)
