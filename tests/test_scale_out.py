"""Lesson 08's servers started for real: Ray Serve (a real Ray cluster) and LitServe serve real test images,
answer the bad-input corpus with 4xx, refuse requests without the token, survive a short load run,
and leave no process (nor temporary folder) behind. Ray Serve with one replica answers or sheds a
crowd of 200 clients within the deadline, and a driver stopped with SIGTERM takes its cluster along."""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import rawhttp

from deploylab import config, data
from deploylab.serving import corpus, litserve_app, load, loadgen, predictor, protocol, ray_serve, slow_clients
from deploylab.serving.api import Client
from deploylab.serving.processes import ServeError


def _reference_top1(model_path, images: np.ndarray) -> np.ndarray:
    """The model's top-1 in this process (ONNX Runtime or ExecuTorch, from the file's suffix)."""
    return predictor.load(model_path, threads=1).run(data.preprocess(images).numpy()).argmax(1)


def _check_server(server, onnx_path) -> None:
    """Parity on real images, the corpus, the token, a short load run: what every server must do."""
    images, _ = data.raw_split("test", 16)
    want = _reference_top1(onnx_path, images)
    url = f"{server.url}/predictions/student"
    png = protocol.png_bytes(images[0])
    assert httpx.post(url, content=png, headers={"Content-Type": "image/png"}, trust_env=False).status_code == 401
    assert httpx.post(url, content=png, headers={"Authorization": "Bearer not-the-key-at-all"}, trust_env=False).status_code == 401
    with server.client() as c:
        assert c.ping() == {"status": "Healthy"}
        got = np.array([c.top1("student", im) for im in images])
        assert (got == want).all(), f"served top-1 differs from the model in process at {np.flatnonzero(got != want)}"
        results = corpus.run_bad_inputs(c, "student", corpus.bad_inputs())
        wrong = [(r["case"], r["status"]) for r in results if not r["ok"]]
        assert not wrong, f"bad inputs not answered with their 4xx: {wrong}"
        assert all(400 <= r["status"] < 500 for r in results)
        run = load.load_run(c, "student", [protocol.png_bytes(im) for im in images], concurrency=8, requests=64,
                            max_seconds=30, progress=False)
        assert run.statuses == {200: 64}, run.statuses


def _listening(processes) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for p in processes for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN]


# A notebook kernel's part, in a process of its own: start Ray Serve, say where it is, wait to be stopped.
DRIVER = r"""
import json, sys, time
from deploylab.serving import ray_serve
server = ray_serve.RayServeServer(sys.argv[1], runtime=sys.argv[4], nodes=1, num_replicas=1, keep_alive_s=int(sys.argv[3])).start()
info = {"url": server.url, "key_file": str(server.key_file), "temp_dir": str(server.cluster.temp_dir),
        "running": server.running(), "replicas": [r["pid"] for r in server.replicas()]}
with open(sys.argv[2] + ".part", "w") as f:
    json.dump(info, f)
import os; os.rename(sys.argv[2] + ".part", sys.argv[2])
time.sleep(600)
"""


KEEP_ALIVE_S = 6  # the test cluster's (the course's 75 s is too long to watch), above httpx's keepalive_expiry (5 s)


class RayDriver:
    """A Python process driving a :class:`RayServeServer` (one replica), as a notebook kernel does."""

    def __init__(self, model_path, workdir, runtime: str):
        self.info_file, self.log = workdir / "driver.json", workdir / "driver.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(model_path), str(self.info_file), str(KEEP_ALIVE_S), runtime],
                                         cwd=config.ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not self.info_file.exists():
            assert self.proc.poll() is None, f"the driver exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"Ray Serve not ready in 240 s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)
        self.info = json.loads(self.info_file.read_text())
        self.url, self.key_file, self.temp_dir = self.info["url"], Path(self.info["key_file"]), self.info["temp_dir"]

    def key(self) -> str:
        return ray_serve.read_key(self.key_file)

    def client(self) -> Client:
        return Client(self.url, self.url, self.url, inference_key=self.key(), management_key=self.key())

    def processes(self) -> list[psutil.Process]:
        """The driver's descendants (the nodes and everything they started) and whatever names the cluster's temp dir."""
        found = {p.pid: p for p in ray_serve.ray_processes(self.temp_dir)}
        with contextlib.suppress(psutil.Error):
            found.update({p.pid: p for p in psutil.Process(self.proc.pid).children(recursive=True)})
        return [p for p in found.values() if _alive(p)]

    def kill_everything(self) -> None:
        """Teardown whatever a failed test left: the driver, then anything of its cluster."""
        left = self.processes()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=30)
        for p in left + self.processes():
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    return False


@pytest.fixture(scope="module")
def ray_driver(program_path, tmp_path_factory):
    """One Ray Serve cluster for this module's Ray tests, driven from its own process (one cluster start, ~20 s).

    It serves what lessons 07-08 serve where lesson 04b chose it: the ExecuTorch INT8 program
    (``runtime="executorch"``); the other servers' tests cover ONNX Runtime through the same ``predictor.load``."""
    driver = RayDriver(program_path, tmp_path_factory.mktemp("ray-driver"), "executorch")
    yield driver
    driver.kill_everything()


def test_ray_serve_serves_and_refuses(ray_driver, program_path):
    assert ray_driver.info["running"] == 1
    procs = ray_driver.processes()
    assert ray_serve.ray_processes(ray_driver.temp_dir), "no Ray process found by its temp dir: the leftover check would see nothing"
    _check_server(ray_driver, program_path)  # top-1 as the ExecuTorch program's in this process
    url_port = int(ray_driver.url.rsplit(":", 1)[1])
    http = [ip for ip, port in _listening(procs) if port == url_port]
    assert http and all(ip == "127.0.0.1" for ip in http), f"Serve's HTTP proxy listens on {http}"


def _first_shed(url: str, key: str, body: bytes, stop: threading.Event) -> httpx.Response | None:
    """Send one request at a time until one is shed (503): what a client is told while the crowd runs."""
    with httpx.Client(trust_env=False, timeout=30) as c:
        while not stop.is_set():
            r = c.post(url, content=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
            if r.status_code == 503:
                return r
    return None


def test_ray_serve_one_replica_answers_or_sheds_a_crowd_of_200(ray_driver, program_path):
    """200 connections at once against one replica, each sending its next request as soon as it has an answer
    (Retry-After ignored: the worst case): every request answered right or shed with 503 and Retry-After,
    each within 10 s -- none left waiting. Meanwhile, a connection idle after its answer is closed after the
    keep-alive timeout given to Serve's http_options (KEEP_ALIVE_S here)."""
    images, _ = data.raw_split("test", 32)
    bodies = [protocol.png_bytes(im) for im in images]
    url, key, port = f"{ray_driver.url}/predictions/student", ray_driver.key(), int(ray_driver.url.rsplit(":", 1)[1])
    requests = loadgen.build_requests("127.0.0.1", port, "/predictions/student", bodies, token=key)
    stop = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        idle = pool.submit(slow_clients.slow_connections, url, key, bodies[0], watch_s=KEEP_ALIVE_S + 3)
        time.sleep(1.0)  # the idle connection has its answer before the crowd arrives
        shed = pool.submit(_first_shed, url, key, bodies[0], stop)
        run = loadgen.closed_loop("127.0.0.1", port, requests, connections=ray_serve.CROWD_CLIENTS, seconds=6,
                                  timeout_s=ray_serve.CROWD_DEADLINE_S, progress=False)
        stop.set()
        idle, shed = idle.result()["idle after an answer"], shed.result()
    assert not run.transport_errors, f"requests without an answer within 10 s (or reset): {run.summary()}"
    assert set(run.statuses) == {200, 503} and run.ok >= 200, run.summary()
    assert run.latencies_s.max() < ray_serve.CROWD_DEADLINE_S, run.summary()
    assert shed is not None and shed.headers.get("retry-after") == str(int(ray_serve.RETRY_AFTER_S)), \
        (shed, shed and dict(shed.headers))
    assert idle["answered"] == 200 and idle["closed after s"] is not None, idle
    assert KEEP_ALIVE_S - 0.5 <= idle["closed after s"] <= KEEP_ALIVE_S + 3, idle
    with ray_driver.client() as c:  # served answers still right after the crowd
        assert c.top1("student", images[0]) == _reference_top1(program_path, images[:1])[0]


def test_a_ray_driver_stopped_with_sigterm_leaves_no_ray_process(ray_driver):
    """SIGTERM to the driver (a notebook kernel shut down): Ray's own handler would exit at once and leave
    the cluster running; the kit's handler stops the cluster first. Last of this module's Ray tests."""
    before = ray_driver.processes()
    names = " ".join(" ".join(p.cmdline()) for p in before)
    for role in ("gcs_server", "raylet", "monitor.py", "log_monitor.py", "ray start", "ServeReplica"):
        assert role in names, f"no {role} process found before SIGTERM: the check below would see nothing"
    t0 = time.monotonic()
    ray_driver.proc.send_signal(signal.SIGTERM)
    code = ray_driver.proc.wait(timeout=30)
    took = time.monotonic() - t0
    gone, alive = psutil.wait_procs(before, timeout=5)
    survivors = [(p.pid, " ".join(p.cmdline())[:80]) for p in alive if _alive(p)]
    assert not survivors, f"Ray processes survived the driver's SIGTERM: {survivors}"
    assert not ray_serve.ray_processes(ray_driver.temp_dir)
    assert code == signal.SIGTERM, f"the driver exited with {code}, not through Ray's handler (sys.exit(15))"
    # measured alone: the cluster stopped 1.4 s after the signal, the driver gone after 2.4 s (Ray's own exit);
    # Jupyter kills a kernel 2.5 s after its SIGTERM. A loaded machine (make test) is slower.
    assert took < 15, f"the driver took {took:.1f} s to exit after SIGTERM"
    assert not ray_driver.key_file.exists(), "the key file outlived the server"


def test_litserve_serves_refuses_and_leaves_nothing(program_path):
    """LitServe with ``--runtime executorch`` on the INT8 program (lesson 08 in smoke serves the ONNX file: both paths run):
    the program's top-1 on real images, the corpus, the token, framing, keep-alive, and nothing left behind."""
    server = litserve_app.LitServeServer(program_path, runtime="executorch", max_batch=8, keep_alive_s=3)  # 75 s is too long to watch
    server.start()
    procs = server.processes()
    try:
        assert len(procs) >= 3, f"LitServe runs an API server, a worker and a queue process: found {len(procs)}"
        made = list(server.tmp_dir.glob("pymp-*"))
        assert made, f"LitServe's multiprocessing manager made no pymp-* folder in {server.tmp_dir}: where did it go?"
        _check_server(server, program_path)
        assert httpx.get(f"{server.url}/health", trust_env=False).status_code == 401  # LitServe's own routes too
        assert httpx.get(f"{server.url}/docs", trust_env=False).status_code == 401
        # the custom server's strict framing (header_timeout): the smuggling shape and oversized headers refused, then closed
        smuggled = rawhttp.exchange(server.port, rawhttp.smuggling_shape(server.key()))
        assert smuggled.startswith(b"HTTP/1.1 400") and smuggled.count(b"HTTP/1.1 ") == 1, smuggled[:300]
        big = rawhttp.exchange(server.port, rawhttp.head(server.key(), f"X-Big: {'a' * 70_000}\r\n"))
        assert big.startswith(b"HTTP/1.1 431"), big[:300]
        addresses = _listening(procs)
        assert addresses and all(ip == "127.0.0.1" for ip, _ in addresses), addresses
        # an idle kept-alive connection lives --keep-alive-s, not uvicorn's 5 s default (httpx's keepalive_expiry: a race)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(rawhttp.head(server.key()))
            assert rawhttp.read_response(sock).startswith(b"HTTP/1.1 200")
            t0 = time.monotonic()
            assert sock.recv(1) == b"", "the server answered nothing, yet sent bytes"
            idle_s = time.monotonic() - t0
        assert 2.5 < idle_s < 4.5, f"LitServe closed an idle connection after {idle_s:.1f} s, not its --keep-alive-s (3)"
    finally:
        server.stop()
    assert not [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "LitServe processes survived"
    assert not server.key_file.exists()
    assert not server.tmp_dir.exists() and not any(m.exists() for m in made), "LitServe's temporary folder outlived stop()"


def test_a_port_in_use_is_a_clear_error(onnx_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = ray_serve.RayServeServer(onnx_path)
        with pytest.raises(ServeError, match=f"port {port} is already in use"):
            server.start(port=port)
        assert server.cluster.temp_dir is None, "the cluster was started although the port was taken"


def test_litserve_refuses_a_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port} is already in use"):
            litserve_app.main(["--model", "x.onnx", "--port", str(port), "--key-file", str(tmp_path / "k.json")])
    assert not (tmp_path / "k.json").exists(), "no key is written for a server that cannot start"


def test_litserve_door_refuses_non_loopback_hosts():
    with pytest.raises(SystemExit, match="refusing to bind"):
        litserve_app.main(["--model", "x.onnx", "--port", "1", "--key-file", "k", "--host", "0.0.0.0"])


def test_build_app_reads_the_key_from_the_environment(onnx_path, monkeypatch):
    """The RayService's path: the key from a Secret (an environment variable), never from Ray's state."""
    monkeypatch.setenv(ray_serve.KEY_ENV, "k" * 32)
    assert ray_serve.read_key(None) == "k" * 32
    app = ray_serve.build_app({"model": str(onnx_path)})
    assert type(app).__name__ == "Application"
    monkeypatch.delenv(ray_serve.KEY_ENV)
    with pytest.raises(ServeError, match="no bearer key"):
        ray_serve.read_key(None)


def test_the_driver_prints_no_raylet_message_and_no_colour_code(monkeypatch, capsys):
    """Ray's error listener prints the raylet's messages (a killed worker...) with ANSI codes whatever
    log_to_driver says; the cluster switches that printing off while it runs, and back on when it stops."""
    import ray

    from deploylab.serving import ray_cluster

    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    monkeypatch.setattr(ray._private.worker, "_worker_logs_enabled", True)
    message = {"lines": ["A worker died or was killed while executing a task"], "pid": "raylet", "is_err": False}
    ray_cluster.quiet_driver()
    ray._private.worker.print_worker_logs(message, sys.stdout)
    assert capsys.readouterr().out == ""
    ray_cluster.quiet_driver(False)
    ray._private.worker.print_worker_logs(message, sys.stdout)
    out = capsys.readouterr().out
    assert "A worker died" in out and "\x1b[" not in out  # printed again, without colour codes


def _defaults(fn, *names) -> tuple:
    """The default values of ``fn``'s parameters ``names``."""
    params = inspect.signature(fn).parameters
    return tuple(params[n].default for n in names)


def test_every_batching_server_uses_the_kits_one_policy():
    """TorchServe, the custom server, LitServe and Ray Serve default to one batching policy (issue 31: like with like),
    in every profile's lesson sizes too; a server that drifts from batching_policy fails here."""
    from deploylab.serving import asgi, batching_policy, server_options, torchserve

    policy = (batching_policy.MAX_BATCH, batching_policy.MAX_WAIT_MS)
    cfg = torchserve.ModelConfig()
    seen = {"TorchServe model config": (cfg.batch_size, cfg.max_batch_delay_ms)}
    for name, table, fields in (("05", torchserve.SIZES, ("batch_size", "max_batch_delay_ms")),
                                ("07", asgi.SIZES, ("max_batch", "max_wait_ms")),
                                ("08", ray_serve.SIZES, ("max_batch", "max_wait_ms"))):
        for profile, sizes in table.items():
            seen[f"lesson {name} {profile}"] = tuple(getattr(sizes, f) for f in fields)
    for fn in (asgi.MicroBatcher.__init__, asgi.create_app, asgi.AsgiServer.__init__,
               litserve_app.StudentAPI.__init__, litserve_app.LitServeServer.__init__):
        seen[fn.__qualname__] = _defaults(fn, "max_batch", "max_wait_ms")
    args = server_options.server_arguments("test").parse_args(["--model", "m.onnx", "--port", "1", "--key-file", "k"])
    seen["server command line"] = (args.max_batch, args.max_wait_ms)
    infer = ray_serve.Classifier.infer  # the @serve.batch wrapper keeps its settings
    seen["Ray Serve @serve.batch"] = (infer._get_max_batch_size(), infer._get_batch_wait_timeout_s() * 1000)
    drifted = {k: v for k, v in seen.items() if (v[0], pytest.approx(v[1])) != policy}
    assert not drifted, f"batching policy {policy} (max batch, max wait ms) not followed by {drifted}"
