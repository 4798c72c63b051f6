"""Unit tests of lesson 06's proxy pieces that need no Docker engine: the proxy's Dockerfile (hadolint),
the certificates and key, the compose file's shape, the behind-the-proxy TorchServe config, the
entrypoint's refusal of a bad key, and the raw-answer parser. tests/test_proxy_integration.py runs the stack."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import yaml

from deploylab.serving import docker_build, proxy

DOCKER = docker_build.DOCKER_DIR


def test_proxy_dockerfile_passes_hadolint():
    findings = [f for f in docker_build.hadolint(proxy.PROXY_DOCKERFILE) if f["level"] in ("error", "warning")]
    assert not findings, findings
    text = proxy.PROXY_DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in text and "USER 10002:10002" in text and "HEALTHCHECK" in text


def test_secrets_chain_to_the_ca_and_stay_private(tmp_path):
    from cryptography import x509

    made = proxy.make_secrets(tmp_path / "p")
    ca = x509.load_pem_x509_certificate(made.ca.read_bytes())
    leaf = x509.load_pem_x509_certificate((made.folder / "tls.crt").read_bytes())
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(proxy.SERVER_NAMES) <= set(sans.get_values_for_type(x509.DNSName))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert (made.folder / "key").read_text() == made.key and len(made.key) >= 32
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o700, "no other user of the host may read the secrets"
    assert sorted(p.name for p in (tmp_path / "p").rglob("*")) == ["ca.crt", "key", "secrets", "tls.crt", "tls.key"], \
        "the CA's private key is never written"
    ctx = proxy.tls_context(made.ca)
    assert ctx.verify_mode.name == "CERT_REQUIRED" and ctx.check_hostname


def test_compose_publishes_only_the_proxy_and_keeps_torchserve_internal():
    spec = yaml.safe_load(proxy.COMPOSE_FILE.read_text())
    serve, front = spec["services"]["serve"], spec["services"]["proxy"]
    assert "ports" not in serve and serve["networks"] == ["backend"] and spec["networks"]["backend"]["internal"] is True
    assert serve["command"][-1] == serve["environment"]["TS_CONFIG_FILE"] == "/app/config-behind-proxy.properties"
    assert all(p.startswith("127.0.0.1:") for p in front["ports"])
    for svc in (serve, front):
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
        assert svc["build"]["args"]["BASE_IMAGE"].endswith("deploylab-debian:bookworm-slim}")
    assert front["depends_on"]["serve"]["condition"] == "service_healthy"


def test_behind_proxy_config_differs_only_in_token_authorization():
    def props(name: str) -> dict[str, str]:
        lines = (DOCKER / name).read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))

    plain, behind = props("config.properties"), props("config-behind-proxy.properties")
    assert {k for k in plain if plain[k] != behind.get(k)} == {"disable_token_authorization"}
    assert plain["disable_token_authorization"] == "false" and behind["disable_token_authorization"] == "true"


def test_nginx_forwards_two_urls_and_sets_the_limits():
    conf = proxy.NGINX_CONF.read_text()
    assert conf.count("proxy_pass ") == 2 and "location = /predictions/student" in conf and "location = /ping" in conf
    for directive in ("client_header_timeout", "client_body_timeout", "large_client_header_buffers", "client_max_body_size",
                      "limit_req ", "limit_conn ", "proxy_http_version 1.1", "keepalive ", "proxy_read_timeout",
                      'add_header Retry-After $retry_after always'):
        assert directive in conf, directive


@pytest.mark.parametrize("key", ["short", "a" * 40 + '"; include /etc/passwd; #', "a" * 40 + " b"])
def test_entrypoint_refuses_a_key_that_is_not_a_plain_token(tmp_path, key):
    (tmp_path / "key").write_text(key)
    done = subprocess.run(["sh", str(DOCKER / "proxy-entrypoint.sh")], capture_output=True, text=True,
                          env={**os.environ, "PROXY_KEY_FILE": str(tmp_path / "key")})
    assert done.returncode == 64 and "proxy:" in done.stderr


def test_split_answers_reads_pipelined_and_chunked_answers():
    data = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    answers = proxy.split_answers(data)
    assert [a.status for a in answers] == [200, 429, 404]
    assert answers[0].body == b"ok" and answers[1].body == b"abc" and answers[1].headers["retry-after"] == "1"


def test_median_interval_uses_the_sign_tests_order_statistics():
    diffs = [-1.0, 0.5, 0.7, -0.1, -104.7, 0.3, 0.9, 0.9, -123.8, 0.2, 0.9, -0.6]  # two disturbed rounds
    low, coverage, high = proxy.median_interval(diffs)
    assert (low, high) == (-1.0, 0.9) and 0.95 <= coverage < 0.97  # 3rd and 10th of 12: the outliers do not reach it
    assert proxy.median_interval([1, 2, 3, 4, 5, 6])[::2] == (1, 6)
    low, coverage, high = proxy.median_interval([0.4, 0.6])  # too few rounds: the whole range, and says so
    assert (low, high) == (0.4, 0.6) and coverage == 0.5
