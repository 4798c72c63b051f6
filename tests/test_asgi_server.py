"""The custom ASGI server, started for real: parity with in-process ONNX Runtime on real images, the
bad-input corpus, bearer tokens, micro-batching under load, the function mode, and nothing left behind."""

from __future__ import annotations

import asyncio
import os
import stat

import httpx
import numpy as np
import pytest

from deploylab import asgi_server, data, export, serve


@pytest.fixture(scope="module")
def server(onnx_path):
    s = asgi_server.AsgiServer(onnx_path, mode="batch", max_batch=8, max_wait_ms=5)
    s.start()
    procs = s.processes()
    yield s
    s.stop()
    assert not [p.pid for p in procs if p.is_running() and p.status() != "zombie"], "server processes survived"
    assert not s.key_file.exists()


def test_key_file_is_private_and_tokens_are_required(server):
    mode = stat.S_IMODE(os.stat(server.key_file).st_mode)
    assert mode == 0o600, oct(mode)
    images, _ = serve.test_images(1)
    png = serve.png_bytes(images[0])
    url = f"{server.url}/predictions/student"
    assert httpx.post(url, content=png, trust_env=False).status_code == 401
    assert httpx.post(url, content=png, headers={"Authorization": "Bearer guess"}, trust_env=False).status_code == 401
    assert httpx.get(f"{server.url}/ping", trust_env=False).status_code == 401
    with server.client() as c:
        assert c.ping() == {"status": "Healthy"}
        assert c.predict("other", png, "image/png").status_code == 404


def test_binds_loopback_only(server):
    import psutil

    conns = [c for p in server.processes() for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert conns and all(c.laddr.ip in ("127.0.0.1", "::1") for c in conns)
    with pytest.raises(SystemExit, match="loopback"):
        asgi_server.main(["--model", "x.onnx", "--port", "1", "--key-file", "k", "--host", "0.0.0.0"])


def test_parity_with_in_process_onnxruntime(server, onnx_path):
    images, labels = serve.test_images(64)
    sess, _ = export.load_exported(onnx_path, threads=1)
    reference = export.run(sess, data.preprocess(images)).argmax(1)
    with server.client() as c:
        par = serve.served_parity(c, "student", images, reference, concurrency=8, progress=False)
        pix = c.predict("student", {"pixels": images[0].astype(int).tolist()})
    assert par["statuses"] == {200: 64} and par["agreement"] == 1.0
    assert pix.status_code == 200 and pix.json()["predictions"][0]["index"] == int(reference[0])


def test_bad_inputs_are_4xx_json_and_server_survives(server):
    with server.client() as c:
        rows = serve.run_bad_inputs(c, "student", serve.bad_inputs())
        bad = [r for r in rows if not (r["ok"] and r["json"])]
        assert not bad, bad
        images, _ = serve.test_images(1)
        assert c.predict("student", serve.png_bytes(images[0]), "image/png").status_code == 200
    too_big = httpx.post(f"{server.url}/predictions/student", content=b"A" * (asgi_server.MAX_REQUEST_BYTES + 1),
                         headers={"Authorization": f"Bearer {server.key()}"}, trust_env=False)
    assert too_big.status_code == 413


def test_micro_batching_under_load(server):
    images, _ = serve.test_images(32)
    bodies = [serve.png_bytes(im) for im in images]
    with server.client() as c:
        r = serve.load_run(c, "student", bodies, concurrency=16, requests=128, max_seconds=30, progress=False)
    assert r.ok == 128 and r.errors_5xx == 0
    sizes = {int(k): v for k, v in server.stats()["batch_sizes"].items()}
    assert max(sizes) > 1 and max(sizes) <= 8, sizes  # batches formed, never above max_batch


def test_micro_batcher_runs_one_call_per_batch():
    calls = []

    def run(x):
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :2] * 2

    async def go():
        b = asgi_server.MicroBatcher(run, max_batch=4, max_wait_ms=50)
        b.arriving = 1  # others are on the way: the batcher waits for them
        b.start()
        xs = [np.full((1, 3), i, dtype=np.float32) for i in range(10)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.stop()
        return outs

    outs = asyncio.run(go())
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(10)]  # every caller gets its own row
    assert calls == [4, 4, 2]


def test_function_mode_serves_the_serverless_handler(onnx_path):
    images, _ = serve.test_images(8)
    sess, _ = export.load_exported(onnx_path, threads=1)
    reference = export.run(sess, data.preprocess(images)).argmax(1)
    with asgi_server.AsgiServer(onnx_path, mode="function") as s:
        procs = s.processes()
        with s.client() as c:
            par = serve.served_parity(c, "student", images, reference, concurrency=4, progress=False)
            rows = serve.run_bad_inputs(c, "student", serve.bad_inputs())
        assert httpx.get(f"{s.url}/ping", trust_env=False).status_code == 401
    assert par["agreement"] == 1.0
    assert all(r["ok"] and r["json"] for r in rows), [r for r in rows if not r["ok"]]
    assert not [p.pid for p in procs if p.is_running() and p.status() != "zombie"]
