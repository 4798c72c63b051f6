"""Lesson 08's servers started for real: Ray Serve (a real Ray cluster) and LitServe serve real test images,
answer the bad-input corpus with 4xx, refuse requests without the token, survive a short load run,
and leave no process behind."""

from __future__ import annotations

import socket

import httpx
import numpy as np
import psutil
import pytest

from deploylab import data, export
from deploylab.serving import corpus, litserve_app, load, protocol, ray_serve
from deploylab.serving.processes import ServeError


def _reference_top1(onnx_path, images: np.ndarray) -> np.ndarray:
    sess, _ = export.load_exported(onnx_path, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: data.preprocess(images).numpy()})[0].argmax(1)


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
        assert (got == want).all(), f"served top-1 differs from in-process ONNX Runtime at {np.flatnonzero(got != want)}"
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


def test_ray_serve_serves_refuses_and_leaves_nothing(onnx_path):
    server = ray_serve.RayServeServer(onnx_path, nodes=1, num_replicas=1)
    server.start()
    temp_dir = server.cluster.temp_dir
    try:
        assert ray_serve.ray_processes(temp_dir), "no Ray process found by its temp dir: the leftover check would see nothing"
        assert server.running() == 1
        _check_server(server, onnx_path)
        http = [ip for ip, port in _listening(server.processes()) if port == server.port]
        assert http and all(ip == "127.0.0.1" for ip in http), f"Serve's HTTP proxy listens on {http}"
    finally:
        server.stop()
    assert not ray_serve.ray_processes(temp_dir), "Ray processes survived stop()"
    assert not server.key_file.exists()


def test_litserve_serves_refuses_and_leaves_nothing(onnx_path):
    server = litserve_app.LitServeServer(onnx_path, max_batch=8)
    server.start()
    procs = server.processes()
    try:
        assert len(procs) >= 3, f"LitServe runs an API server, a worker and a queue process: found {len(procs)}"
        _check_server(server, onnx_path)
        assert httpx.get(f"{server.url}/health", trust_env=False).status_code == 401  # LitServe's own routes too
        assert httpx.get(f"{server.url}/docs", trust_env=False).status_code == 401
        addresses = _listening(procs)
        assert addresses and all(ip == "127.0.0.1" for ip, _ in addresses), addresses
    finally:
        server.stop()
    assert not [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "LitServe processes survived"
    assert not server.key_file.exists()


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
