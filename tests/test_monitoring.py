"""Lesson 09's pieces: the alert rules under promtool (and a broken copy failing), the custom server's
/metrics in Prometheus' conventions (one process and two), a real Prometheus scraping it, the drift statistics."""

from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import pytest
import yaml

from deploylab import data
from deploylab.ops import drift, prometheus
from deploylab.serving import api, asgi, loadgen, protocol

needs_prometheus = pytest.mark.skipif(prometheus.missing() is not None,
                                      reason="Prometheus/promtool not installed: `sudo apt-get install prometheus` "
                                             "(make setup does it as root)")


# --------------------------------------------------------------------------------------------
# The rules, tested by promtool; a broken rule must make the test fail
# --------------------------------------------------------------------------------------------


@needs_prometheus
def test_promtool_checks_and_tests_the_committed_rules():
    checked = prometheus.promtool("check", "rules", prometheus.RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = prometheus.promtool("test", "rules", prometheus.RULES_TEST)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


@needs_prometheus
def test_a_broken_rule_fails_promtool(tmp_path):
    """The proof that the test above can fail: a threshold ten times too lax fails `promtool test rules`,
    a PromQL syntax error fails `promtool check rules`."""
    text = prometheus.RULES.read_text()
    assert text.count("> 14.4 * 0.01\n") == 2
    shutil.copy(prometheus.RULES_TEST, tmp_path / "rules_test.yml")
    (tmp_path / "rules.yml").write_text(text.replace("> 14.4 * 0.01\n", "> 14.4 * 0.1\n"))
    assert prometheus.promtool("check", "rules", tmp_path / "rules.yml").returncode == 0  # valid, but wrong
    lax = prometheus.promtool("test", "rules", tmp_path / "rules_test.yml")
    assert lax.returncode != 0 and "LatencyBudgetFastBurn" in lax.stdout + lax.stderr
    unbalanced = text.replace("sum(rate(deploylab_requests_total[5m])) or", "sum(rate(deploylab_requests_total[5m]) or", 1)
    assert unbalanced != text
    (tmp_path / "rules.yml").write_text(unbalanced)
    assert prometheus.promtool("check", "rules", tmp_path / "rules.yml").returncode != 0


@needs_prometheus
def test_scaled_rules_keep_the_expressions_and_stay_valid(tmp_path):
    rules = yaml.safe_load(prometheus.RULES.read_text())
    fast = prometheus.scaled_rules(rules, {"1h": "30s", "5m": "6s", "2m": "3s", "10m": "10s"})
    exprs = [r["expr"] for g in fast["groups"] for r in g["rules"]]
    assert all("[1h]" not in e and "[5m]" not in e for e in exprs) and any("[30s]" in e for e in exprs)
    assert [r["for"] for g in fast["groups"] for r in g["rules"]] == ["3s", "3s", "10s"]
    checked = prometheus.promtool("check", "rules", prometheus.write_yaml(tmp_path / "fast.yml", fast))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --------------------------------------------------------------------------------------------
# /metrics of the custom server, and Prometheus scraping it
# --------------------------------------------------------------------------------------------


def _scrape(server: asgi.AsgiServer) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.key()}"}, trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in api.parse_prometheus(r.text)}


def _load(server: asgi.AsgiServer, bodies: list[bytes], n: int) -> loadgen.LoadgenResult:
    reqs = loadgen.build_requests("127.0.0.1", server.port, "/predictions/student", bodies, token=server.key())
    return loadgen.closed_loop("127.0.0.1", server.port, reqs, connections=8, count=n, progress=False)


def _check_counts(m: dict, ok: int, bad: int) -> None:
    """Prometheus' conventions, and every request counted once: by status, in the histogram, in a batch."""
    assert m[("deploylab_requests_total", (("code", "200"),))] == ok
    assert m[("deploylab_requests_total", (("code", "415"),))] == bad  # "not an image" sent as image/png
    assert m[("deploylab_request_duration_seconds_count", ())] == ok + bad
    assert m[("deploylab_request_duration_seconds_bucket", (("le", "+Inf"),))] == ok + bad
    assert m[("deploylab_request_duration_seconds_bucket", (("le", "0.05"),))] <= ok + bad
    assert m[("deploylab_batch_size_sum", ())] == ok  # every valid input went through one batch, none twice
    assert m[("deploylab_requests_in_flight", ())] == 0


def test_two_processes_share_their_metrics(onnx_path):
    """--processes 2: whichever worker answers the scrape, it answers for both (multiprocess mode)."""
    images, _ = data.raw_split("test", 16)
    bodies = [protocol.png_bytes(im) for im in images] + [b"not an image"]
    with asgi.AsgiServer(onnx_path, max_batch=8, processes=2, metrics=True) as server:
        assert httpx.get(f"{server.url}/metrics", trust_env=False).status_code == 401  # the token guards it too
        run = _load(server, bodies, 170)
        scrapes = [_scrape(server) for _ in range(4)]  # new connections: both workers get to answer
        pids = {p.pid for p in server.processes()}
    assert run.statuses == {200: 160, 415: 10} and len(pids) >= 3  # the supervisor and two workers
    for m in scrapes:
        _check_counts(m, 160, 10)


@needs_prometheus
def test_prometheus_scrapes_the_server_and_answers_promql(onnx_path, tmp_path):
    images, _ = data.raw_split("test", 8)
    bodies = [protocol.png_bytes(im) for im in images] + [b"not an image"]
    with asgi.AsgiServer(onnx_path, max_batch=8, metrics=True) as server:
        assert httpx.get(f"{server.url}/metrics", trust_env=False).status_code == 401
        token = prometheus.write_token_file(tmp_path / "token", server.key())
        cfg = prometheus.scrape_config([prometheus.Target("custom-server", (f"127.0.0.1:{server.port}",), token_file=str(token))],
                                       scrape_interval="1s", evaluation_interval="1s")
        rules = prometheus.scaled_rules(yaml.safe_load(prometheus.RULES.read_text()), {"1h": "10s", "5m": "3s", "2m": "1s", "10m": "1s"})
        with prometheus.Prometheus(cfg, rules={"rules.yml": rules}, workdir=tmp_path / "prom") as prom:
            assert [t["health"] for t in prom.wait_for_targets()] == ["up"]
            run = _load(server, bodies, 90)
            m = _scrape(server)
            total = None
            for _ in range(40):  # the next scrape (1 s) carries the 80 answers
                total = prom.value('sum(deploylab_requests_total{code="200"})')
                if total == 80:
                    break
                time.sleep(0.25)
            assert total == 80
            assert prom.value("histogram_quantile(0.99, sum by (le) (rate(deploylab_request_duration_seconds_bucket[30s])))") > 0
            loaded = {r["name"] for g in prom.rule_groups() for r in g["rules"]}
            assert loaded == {"LatencyBudgetFastBurn", "ErrorBudgetFastBurn", "NoTraffic"}
            with pytest.raises(prometheus.PrometheusError):
                prom.query("rate(deploylab_requests_total[")
            procs = prom.processes()
        assert not [p for p in procs if p.is_running() and p.status() != "zombie"]
        assert not prom.storage.exists()
    assert run.statuses == {200: 80, 415: 10}
    _check_counts(m, 80, 10)
    assert m[("process_cpu_seconds_total", ())] > 0  # one process: its own CPU time too


# --------------------------------------------------------------------------------------------
# Drift statistics
# --------------------------------------------------------------------------------------------


def test_ks_and_psi_statistics():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 2000)
    assert drift.ks_statistic(a, a) == 0.0
    assert drift.ks_statistic(np.zeros(10), np.ones(10)) == 1.0
    assert drift.ks_statistic(a, rng.normal(0, 1, 2000)) < 0.06 < drift.ks_statistic(a, rng.normal(0.5, 1, 2000))
    labels = rng.integers(0, 10, 5000)
    assert drift.psi(labels, labels) == 0.0
    assert drift.psi(labels, rng.integers(0, 10, 5000)) < 0.02 < drift.psi(labels, np.concatenate([labels[:2500], np.zeros(2500, int)]))


def test_shifts_keep_shape_and_class_mix_follows_its_shares():
    images, labels = data.raw_split("val", 2000)
    for kind in ("none", *drift.SHIFTS, "class mix"):
        x, y = drift.shifted_stream(kind, images, labels)
        assert x.shape == images.shape and x.dtype == np.uint8 and len(y) == len(labels)
        assert kind == "none" or kind == "class mix" or (x != images[np.random.default_rng(0).permutation(len(labels))]).any()
    _, y = drift.shifted_stream("class mix", images, labels)
    share = np.bincount(y, minlength=10) / len(y)
    assert abs(share[0] - 0.35) < 0.04 and abs(share[6] - 0.35) < 0.04 and share[1] < 0.08


def test_detector_threshold_from_validation_flags_a_shift_and_rarely_the_unshifted():
    val, _ = data.raw_split("val", 3000)
    feats = drift.image_features(val)
    det = drift.Detector("inputs", drift.input_statistic, feats[:1500])
    det.calibrate(feats[1500:], window=100, count=300, false_alarm=0.01)
    test, test_labels = data.raw_split("test", 2000)
    clean = det.evaluate(drift.image_features(drift.shifted_stream("none", test, test_labels)[0]), 100)
    bright = det.evaluate(drift.image_features(drift.shifted_stream("brightness/contrast", test, test_labels)[0]), 100)
    assert clean["alarm_rate"] <= 0.15
    assert bright["alarm_rate"] == 1.0 and bright["delay_images"] == 100
