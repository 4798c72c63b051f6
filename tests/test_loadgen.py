"""The load generator against the real custom ASGI server: offered rate kept, queueing counted from the
intended send time, its own CPU per request far below the server's, transport errors counted apart."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from deploylab import data
from deploylab.serving import asgi, loadgen, processes, protocol


@pytest.fixture(scope="module")
def server(onnx_path):
    s = asgi.AsgiServer(onnx_path, mode="batch", max_batch=8, max_wait_ms=2)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def requests(server):
    images, _ = data.raw_split("test", 32)
    return loadgen.build_requests("127.0.0.1", server.port, "/predictions/student",
                                  [protocol.png_bytes(im) for im in images], token=server.key())


def test_open_loop_keeps_its_offered_rate_at_light_load(server, requests):
    r = loadgen.open_loop("127.0.0.1", server.port, requests, rate=200, count=400, progress=False)
    assert r.statuses == {200: 400} and not r.transport_errors
    assert 0.85 * 200 < r.achieved_rate < 1.15 * 200, r.summary()
    p = r.percentiles_ms()
    assert p["n"] == 400 and 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["p99.9"], p


def test_overload_shows_as_queueing_in_open_loop_latency(server, requests):
    """Offered at 2.5x what the server can do, the requests keep coming on schedule, so their latency from
    the intended send time grows with the queue: the overload is visible (no coordinated omission)."""
    capacity = loadgen.closed_loop("127.0.0.1", server.port, requests, connections=32, seconds=1.0, progress=False)
    light = loadgen.open_loop("127.0.0.1", server.port, requests, rate=capacity.achieved_rate / 4, seconds=1.0,
                              progress=False)
    heavy = loadgen.open_loop("127.0.0.1", server.port, requests, rate=capacity.achieved_rate * 2.5, seconds=0.8,
                              progress=False)
    assert heavy.sent == pytest.approx(capacity.achieved_rate * 2.5 * 0.8, rel=0.01)
    assert heavy.achieved_rate < 1.5 * capacity.achieved_rate, (capacity.summary(), heavy.summary())
    assert heavy.percentiles_ms()["p50"] > 10 * light.percentiles_ms()["p50"], (light.summary(), heavy.summary())


def test_the_generator_costs_at_most_a_tenth_of_the_server_per_request(server, requests):
    before = processes.cpu_seconds(server.processes())
    r = loadgen.closed_loop("127.0.0.1", server.port, requests, connections=32, seconds=3, progress=False)
    server_ms = 1e3 * (processes.cpu_seconds(server.processes()) - before) / r.sent
    assert r.statuses.get(200) == r.sent
    assert r.generator_cpu_ms_per_request <= 0.10 * server_ms, (r.summary(), f"server {server_ms:.3f} CPU-ms per request")


def test_transport_errors_are_counted_apart_from_statuses():
    port = processes.free_ports(1)[0]  # nothing listens there
    requests = loadgen.build_requests("127.0.0.1", port, "/ping", [b""])
    r = loadgen.open_loop("127.0.0.1", port, requests, rate=100, count=20, progress=False)
    assert r.statuses == {} and sum(r.transport_errors.values()) == 20, r.transport_errors
    c = loadgen.closed_loop("127.0.0.1", port, requests, connections=4, count=20, progress=False)
    assert c.statuses == {} and sum(c.transport_errors.values()) == 4, c.transport_errors


def test_runs_on_the_cores_it_is_given_and_talks_to_loopback_only(server, requests):
    allowed = os.sched_getaffinity(0)
    r = loadgen.closed_loop("127.0.0.1", server.port, requests, connections=2, count=20, cpus=[min(allowed)],
                            progress=False)
    assert r.cpus == (min(allowed),) and os.sched_getaffinity(0) == allowed
    with pytest.raises(ValueError, match="loopback"):
        loadgen.build_requests("10.0.0.1", 80, "/", [b""])


def test_mlperf_scenarios_on_the_custom_server(server, requests):
    from deploylab.serving import scenarios

    single = scenarios.single_stream("127.0.0.1", server.port, requests, count=60, progress=False)
    assert single.connections == 1 and single.ok == 60
    cost, off = scenarios.cpu_cost(lambda: {"server": server.processes()},
                                   lambda: scenarios.offline("127.0.0.1", server.port, requests, seconds=1.0, progress=False))
    assert off.ok == off.sent and cost.per_request_ms["server"] > cost.per_request_ms["generator"] > 0
    assert cost.price_per_million(0.05) == pytest.approx(cost.server_ms * 1e6 / 3.6e6 * 0.05)
    slo_ms = max(20.0, 4 * single.percentiles_ms()["p90"])
    search = scenarios.server_capacity("127.0.0.1", server.port, requests, slo_ms=slo_ms, low=off.achieved_rate / 10,
                                       high=off.achieved_rate * 2, seconds=0.4, min_samples=200, steps=4, progress=False)
    rows = search.table()
    assert search.best is not None and 0 < search.capacity < off.achieved_rate * 2, rows
    assert search.best.percentiles_ms()["p99"] <= slo_ms
    assert any(r["SLO"] == "missed" and r["offered/s"] > search.capacity for r in rows), rows  # the knee was crossed


def test_a_recorded_closed_loop_keeps_each_request_refusals_and_answers_and_stops_when_told(server, requests):
    """The drill mode behind ``load.load_run``: every request on the timeline, the first refusal of each
    status with its message, each 200's body with its request index, and ``during`` stopping the sends."""
    import json

    wrong_key = loadgen.build_requests("127.0.0.1", server.port, "/predictions/student", [b"x"], token="not-the-key")
    mixed = [requests[0], wrong_key[0]]
    r = loadgen.closed_loop("127.0.0.1", server.port, mixed, connections=1, count=20, record=True, progress=False)
    assert r.statuses == {200: 10, 401: 10} and len(r.timeline) == 20
    assert [s for _, s in sorted(r.timeline)] == [200, 401] * 10
    assert set(r.refusals) == {401} and r.refusals[401].startswith(b"HTTP/1.1 401")
    assert [i % 2 for i, _ in r.answers] == [0] * 10 and all(json.loads(b)["predictions"] for _, b in r.answers)
    calls = []
    stopped = loadgen.closed_loop("127.0.0.1", server.port, requests, connections=4, seconds=30, record=True, progress=False,
                                  during=lambda elapsed: calls.append(elapsed) or elapsed > 0.3)
    assert stopped.seconds < 2 and len(calls) >= 5 and stopped.ok == stopped.sent > 0, stopped.summary()


def test_server_search_stops_at_its_resolution_and_reports_its_bracket(monkeypatch):
    """The search logic alone (a server whose p99 crosses the SLO at 1,000 requests/s): it stops once the highest
    rate met and the lowest missed are within 5%, and the bracket names both."""
    from types import SimpleNamespace

    from deploylab.serving import scenarios

    def fake_open_loop(host, port, requests, *, rate, count, **kwargs):
        p99 = 10.0 if rate <= 1000 else 80.0
        return SimpleNamespace(ok=count, sent=count, achieved_rate=rate, offered_rate=rate,
                               percentiles_ms=lambda: {"p50": 5.0, "p99": p99, "n": count})

    monkeypatch.setattr(scenarios, "open_loop", fake_open_loop)
    search = scenarios.server_capacity("127.0.0.1", 1, [b""], slo_ms=50, low=100, high=2400, seconds=1, steps=20)
    low, high = search.bracket
    assert low <= 1000 < high <= low * 1.05
    assert len(search.trials) <= 2 + 7  # log2(ln 24 / ln 1.05) = 6.02 bisections, not all 20
    coarse = scenarios.server_capacity("127.0.0.1", 1, [b""], slo_ms=50, low=100, high=2400, seconds=1, steps=2)
    assert coarse.bracket[1] > coarse.bracket[0] * 1.5  # two steps leave a wide bracket, and it says so


def test_an_idle_connection_the_server_closes_is_not_a_failed_request(onnx_path):
    """A server closes a kept-alive connection after its idle timeout, as HTTP allows. The generator drops it and
    opens a new one for the next request: no transport error, every request answered (it once counted the close
    as a failed request, which zeroed a Server-scenario capacity)."""
    rate, count, seed = 1.0, 5, 10
    gaps = np.diff(loadgen.poisson_schedule(rate, count, seed))
    assert (gaps > 1.5).sum() >= 2, gaps  # idle gaps longer than the server's 1 s keep-alive
    with asgi.AsgiServer(onnx_path, mode="batch", keep_alive_s=1) as s:
        images, _ = data.raw_split("test", 4)
        requests = loadgen.build_requests("127.0.0.1", s.port, "/predictions/student",
                                          [protocol.png_bytes(im) for im in images], token=s.key())
        r = loadgen.open_loop("127.0.0.1", s.port, requests, rate=rate, count=count, seed=seed, progress=False)
    assert r.statuses == {200: count} and not r.transport_errors, r.summary()


def test_an_idle_connection_past_its_expiry_is_not_reused(server, requests, monkeypatch):
    run = loadgen._Run("127.0.0.1", server.port, requests, 4, 5.0, 0, False)
    first = run.connection()
    run.send(first, 0, time.perf_counter())
    deadline = time.perf_counter() + 5
    while not run.idle and time.perf_counter() < deadline:
        run.idle.extend(run.read(0.05))
    assert run.idle == [first] and run.statuses == {200: 1}
    assert run.connection() is first  # fresh: reused
    run.idle.append(first)
    monkeypatch.setattr(loadgen, "IDLE_EXPIRY_S", 0.0)
    time.sleep(0.01)
    second = run.connection()
    assert second is not first and run.open == 1 and first.sock.fileno() == -1  # the stale one closed, a new one opened
    run.finish("closed", None, run.started, 0.0, ())
