"""The custom ASGI server, started for real: parity with in-process ONNX Runtime on real images, the
bad-input corpus, bearer tokens, micro-batching under load, the function mode, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import httpx
import numpy as np
import pytest
import rawhttp

from deploylab import data, export, onnxrt
from deploylab.serving import asgi, corpus, load, predictor, protocol
from deploylab.serving.header_timeout import HTTP_PARSERS
from deploylab.serving.processes import ServeError


@pytest.fixture(scope="module")
def server(onnx_path):
    s = asgi.AsgiServer(onnx_path, mode="batch", max_batch=8, max_wait_ms=5, body_timeout_s=2.0, header_timeout_s=2.0)
    s.start()
    procs = s.processes()
    yield s
    s.stop()
    assert not [p.pid for p in procs if p.is_running() and p.status() != "zombie"], "server processes survived"
    assert not s.key_file.exists()


@pytest.fixture(scope="module", params=HTTP_PARSERS)
def parser_server(request, server, onnx_path):
    """The server on each of uvicorn's HTTP parsers (``--http``): the header deadline and the strict framing hold on both."""
    if request.param == server.http:
        yield server
        return
    with asgi.AsgiServer(onnx_path, mode="batch", max_batch=8, max_wait_ms=5, body_timeout_s=2.0, header_timeout_s=2.0,
                         http=request.param) as s:
        yield s


def test_key_file_is_private_and_tokens_are_required(server):
    mode = stat.S_IMODE(os.stat(server.key_file).st_mode)
    assert mode == 0o600, oct(mode)
    images, _ = data.raw_split("test", 1)
    png = protocol.png_bytes(images[0])
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
        asgi.main(["--model", "x.onnx", "--port", "1", "--key-file", "k", "--host", "0.0.0.0"])


def test_key_file_of_a_stopped_server_is_replaced_and_of_a_running_one_refused(tmp_path):
    """A restart with the same --key-file works after a crash (the old file names a pid that is gone);
    a second server on a key file in use is refused instead of taking it over."""
    import subprocess
    import sys

    path = tmp_path / "key_file.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    path.write_text(json.dumps({"inference": {"key": "old"}, "pid": int(gone.stdout)}))
    key = asgi.write_key_file(path)
    assert json.loads(path.read_text()) == {"inference": {"key": key}, "pid": os.getpid()} and key != "old"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text(json.dumps({"inference": {"key": "theirs"}, "pid": os.getppid()}))  # a process that runs
    with pytest.raises(SystemExit, match="belongs to a running server"):
        asgi.write_key_file(path)
    assert json.loads(path.read_text())["inference"]["key"] == "theirs"


def test_parity_with_in_process_onnxruntime(server, onnx_path):
    images, labels = data.raw_split("test", 64)
    sess, _ = export.load_exported(onnx_path, threads=1)
    reference = onnxrt.run(sess, data.preprocess(images)).argmax(1)
    with server.client() as c:
        par = load.served_parity(c, "student", images, reference, concurrency=8, progress=False)
        pix = c.predict("student", {"pixels": images[0].astype(int).tolist()})
    assert par["statuses"] == {200: 64} and par["agreement"] == 1.0
    assert pix.status_code == 200 and pix.json()["predictions"][0]["index"] == int(reference[0])


def test_bad_inputs_are_4xx_json_and_server_survives(server):
    with server.client() as c:
        rows = corpus.run_bad_inputs(c, "student", corpus.bad_inputs())
        bad = [r for r in rows if not (r["ok"] and r["json"])]
        assert not bad, bad
        images, _ = data.raw_split("test", 1)
        assert c.predict("student", protocol.png_bytes(images[0]), "image/png").status_code == 200
    too_big = httpx.post(f"{server.url}/predictions/student", content=b"A" * (asgi.MAX_REQUEST_BYTES + 1),
                         headers={"Authorization": f"Bearer {server.key()}"}, trust_env=False)
    assert too_big.status_code == 413


def test_a_form_upload_is_answered_like_the_raw_image(server):
    """curl -F image=@shirt.png works on the custom server too (protocol.decode_http unpacks the form)."""
    png = protocol.png_bytes(data.raw_split("test", 1)[0][0])
    auth = {"Authorization": f"Bearer {server.key()}"}
    url = f"{server.url}/predictions/student"
    raw = httpx.post(url, content=png, headers={**auth, "Content-Type": "image/png"}, trust_env=False)
    form = httpx.post(url, files={"image": ("shirt.png", png, "image/png")}, headers=auth, trust_env=False)
    assert raw.status_code == 200 and form.status_code == 200 and form.json() == raw.json(), form.text[:200]


def test_micro_batching_under_load(server):
    images, _ = data.raw_split("test", 32)
    bodies = [protocol.png_bytes(im) for im in images]
    with server.client() as c:
        r = load.load_run(c, "student", bodies, concurrency=16, requests=128, max_seconds=30, progress=False)
    assert r.ok == 128 and r.errors_5xx == 0
    sizes = {int(k): v for k, v in server.stats()["batch_sizes"].items()}
    assert max(sizes) > 1 and max(sizes) <= 8, sizes  # batches formed, never above max_batch


def test_micro_batcher_runs_one_call_per_batch():
    calls = []

    def run(x):
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :2] * 2

    async def go():
        b = asgi.MicroBatcher(run, max_batch=4, max_wait_ms=50)
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
    images, _ = data.raw_split("test", 8)
    sess, _ = export.load_exported(onnx_path, threads=1)
    reference = onnxrt.run(sess, data.preprocess(images)).argmax(1)
    with asgi.AsgiServer(onnx_path, mode="function") as s:
        procs = s.processes()
        with s.client() as c:
            par = load.served_parity(c, "student", images, reference, concurrency=4, progress=False)
            rows = corpus.run_bad_inputs(c, "student", corpus.bad_inputs())
        assert httpx.get(f"{s.url}/ping", trust_env=False).status_code == 401
    assert par["agreement"] == 1.0
    assert all(r["ok"] and r["json"] for r in rows), [r for r in rows if not r["ok"]]
    assert not [p.pid for p in procs if p.is_running() and p.status() != "zombie"]


def test_a_full_queue_is_shed_with_503_and_retry_after():
    """Load shedding on purpose: past max_queue waiting inputs, submit refuses at once (the app answers 503)."""
    async def scenario():
        release = asyncio.Event()

        def slow(x):
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()  # the model is busy until released
            return np.zeros((len(x), 10), dtype=np.float32)

        loop = asyncio.get_running_loop()
        b = asgi.MicroBatcher(slow, max_batch=1, max_wait_ms=0, max_queue=2)
        b.start()
        x = np.zeros((1, 1, 32, 32), dtype=np.float32)
        first = asyncio.create_task(b.submit(x))  # taken by the model, which blocks
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(b.submit(x)) for _ in range(2)]  # fill the queue
        await asyncio.sleep(0.05)
        with pytest.raises(asgi.Overloaded, match="limit is 2"):
            await b.submit(x)
        release.set()
        done = await asyncio.gather(first, *queued)
        await b.stop()
        return done

    assert [d.shape for d in asyncio.run(scenario())] == [(1, 10)] * 3


def test_a_body_shorter_than_its_content_length_gets_408_within_the_timeout(parser_server):
    """A client that announces 1,000 bytes and sends 10 is answered 408, not left holding the connection."""
    import socket
    import time

    key = parser_server.key()
    head = (f"POST /predictions/student HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", parser_server.port), timeout=15) as sock:
        t0 = time.monotonic()
        sock.sendall(head + b"x" * 10)
        answer = sock.recv(4096).decode(errors="replace")
        waited = time.monotonic() - t0
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert 1.5 < waited < 10, f"answered after {waited:.1f} s; the server's body timeout is 2 s"


@pytest.mark.parametrize("sent", [b"", b"POST /predictions/student HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "],
                         ids=["nothing", "half the headers"])
def test_a_connection_without_complete_headers_is_closed_within_the_header_timeout(parser_server, sent):
    """Slowloris: a client that opens a connection and sends no (or half its) headers is cut off, while
    a client that trickles one more header byte every 0.5 s does not keep it open either."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", parser_server.port), timeout=15) as sock:
        t0 = time.monotonic()
        sock.sendall(sent)
        closed = False
        while time.monotonic() - t0 < 8:
            try:
                sock.sendall(b"x" if sent else b"")  # trickle a header byte: each arrives well within any per-byte timeout
            except OSError:
                closed = True
                break
            sock.settimeout(0.5)
            try:
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        waited = time.monotonic() - t0
    assert closed, f"the connection was still open after {waited:.1f} s; the server's header timeout is 2 s"
    assert 1.5 < waited < 5, f"closed after {waited:.1f} s; the server's header timeout is 2 s"
    assert httpx.get(f"{parser_server.url}/ping", headers={"Authorization": f"Bearer {parser_server.key()}"},
                     trust_env=False).status_code == 200  # and the server still answers


def test_one_process_per_core_shares_one_socket_and_reports_every_worker(onnx_path):
    """``processes=2``: two workers on one loopback socket, each with its own model; parity on real images,
    tokens still required, a load run answered, each worker's statistics after stop, nothing left running."""
    import psutil

    images, _ = data.raw_split("test", 64)
    sess, _ = export.load_exported(onnx_path, threads=1)
    reference = onnxrt.run(sess, data.preprocess(images)).argmax(1)
    bodies = [protocol.png_bytes(im) for im in images]
    s = asgi.AsgiServer(onnx_path, mode="batch", processes=2).start()
    try:
        procs = s.processes()
        assert len(list(s.stats_dir.glob("ready-*"))) == 2 and len(procs) >= 3  # the supervisor + 2 workers
        listening = [c for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"} and {c.laddr.port for c in listening} == {s.port}
        assert httpx.post(f"{s.url}/predictions/student", content=bodies[0], trust_env=False).status_code == 401
        with s.client() as c:
            par = load.served_parity(c, "student", images, reference, concurrency=8, progress=False)
            run = load.load_run(c, "student", bodies, concurrency=16, requests=128, max_seconds=20, progress=False)
    finally:
        s.stop()
    assert par["agreement"] == 1.0 and run.ok == 128
    merged = s.final_stats()
    assert len(merged["pids"]) == 2 and set(merged["pids"]) <= {p.pid for p in procs}
    assert sum(k * v for k, v in merged["batch_sizes"].items()) >= 64 + 128 and "onnxruntime" in merged["modules"]
    assert not [p.pid for p in procs if p.is_running() and p.status() != "zombie"]
    assert not s.key_file.exists()


def test_a_missing_worker_statistics_file_is_an_error_not_a_partial_count(onnx_path, tmp_path):
    s = asgi.AsgiServer(onnx_path, processes=2, workdir=tmp_path)
    s.stats_dir.mkdir()
    (s.stats_dir / "worker-1.json").write_text(json.dumps({"pid": 1, "batch_sizes": {"1": 3}, "modules": []}))
    with pytest.raises(asgi.ServeError, match="1 of 2 worker statistics"):
        s.final_stats()
    with pytest.raises(ValueError, match="processes"):
        asgi.AsgiServer(onnx_path, processes=0)


def _exchange(port: int, request: bytes) -> bytes:
    return rawhttp.exchange(port, request)


def _head(server, extra: str, target: str = "/ping", method: str = "GET") -> bytes:
    return rawhttp.head(server.key(), extra, target, method)


def test_a_request_with_content_length_and_transfer_encoding_is_refused_and_the_connection_closed(parser_server):
    """The request-smuggling shape: a body framed one way by the length, another by the chunks. The
    smuggled second request (a /ping inside the body) must never be answered."""
    answer = _exchange(parser_server.port, rawhttp.smuggling_shape(parser_server.key()))
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    # h11 lets it through, and our check refuses it; llhttp (httptools) refuses it itself, before the headers complete
    assert b"Content-Length" in answer and b"Transfer-Encoding" in answer and answer.count(b"HTTP/1.1 ") == 1, answer[:600]


@pytest.mark.parametrize("encoding", ["chunked, identity", "chunked\x0b", "identity"])
def test_an_obfuscated_transfer_encoding_is_refused(parser_server, encoding):
    request = _head(parser_server, f"Content-Type: image/png\r\nTransfer-Encoding: {encoding}\r\n", "/predictions/student", "POST")
    answer = _exchange(parser_server.port, request + b"0\r\n\r\n" + _head(parser_server, ""))
    assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 501"), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, answer[:600]


def test_oversized_headers_are_refused_with_431(parser_server):
    from deploylab.serving.header_timeout import MAX_HEADER_BYTES

    answer = _exchange(parser_server.port, _head(parser_server, f"X-Big: {'a' * (70 * 1024)}\r\n"))  # one write: h11 alone read it whole
    assert answer.startswith(b"HTTP/1.1 431"), answer[:300]
    ok = _exchange(parser_server.port, _head(parser_server, f"X-Fits: {'a' * (MAX_HEADER_BYTES // 2)}\r\nConnection: close\r\n"))
    assert ok.startswith(b"HTTP/1.1 200"), ok[:300]



def test_oversized_headers_sent_in_pieces_are_refused_before_the_header_deadline(parser_server):
    """A header line that grows past the limit in 4 KiB writes is refused -- 431 (httptools: llhttp keeps an unfinished
    field whole, so the reads are counted), or 400 (h11's bound on an incomplete event) -- and closed at once, not
    left to grow until the header deadline."""
    import select
    import socket
    import time

    from deploylab.serving.header_timeout import MAX_HEADER_BYTES

    answer = b""
    with socket.create_connection(("127.0.0.1", parser_server.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        sock.sendall(_head(parser_server, "")[:-2] + b"X-Big: ")
        for _ in range(2 * MAX_HEADER_BYTES // 4096):
            sock.sendall(b"a" * 4096)
            if select.select([sock], [], [], 0.05)[0]:  # answered: stop sending (a write after the close would reset)
                break
        while chunk := sock.recv(65536):
            answer += chunk
        waited = time.monotonic() - t0
    assert answer[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400"), answer[:300]
    assert waited < parser_server.header_timeout_s, f"closed after {waited:.1f} s: the header deadline, not the size limit"

def test_an_idle_kept_alive_connection_outlives_the_header_timeout_and_a_slow_next_request_does_not(parser_server):
    """The keep-alive race behind 07's status 0: the header deadline used to start when a response
    completed, so the server closed an idle connection after the header timeout, the moment a client
    could reuse it. Now an idle connection stays open for the keep-alive timeout (75 s), and the
    header deadline starts with the next request's first byte."""
    import socket
    import time

    request = _head(parser_server, "")
    with socket.create_connection(("127.0.0.1", parser_server.port), timeout=10) as sock:
        sock.sendall(request)
        assert rawhttp.read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(parser_server.header_timeout_s + 1.0)  # idle longer than the header timeout
        sock.sendall(request)
        assert rawhttp.read_response(sock).startswith(b"HTTP/1.1 200"), "the server closed an idle kept-alive connection"
        sock.sendall(request[:20])  # then half a request: its deadline runs from this byte
        t0 = time.monotonic()
        sock.settimeout(parser_server.header_timeout_s + 3)
        assert sock.recv(65536) == b"", "half a request on a kept-alive connection was not cut off"
        waited = time.monotonic() - t0
    assert parser_server.header_timeout_s - 0.5 < waited < parser_server.header_timeout_s + 2, waited


def test_requests_after_idle_gaps_around_the_timeouts_never_fail_in_transport(parser_server):
    """Bursts separated by idle gaps swept around the header timeout and httpx's keep-alive expiry
    (both 2 s here): every request after a gap is answered, none fails with a transport error."""
    import concurrent.futures
    import time

    gaps = [parser_server.header_timeout_s - 0.06 + 0.005 * i for i in range(25)]  # 1.94 .. 2.06 s

    def burst_gap_burst(gap: float) -> list[str]:
        limits = httpx.Limits(max_keepalive_connections=1, keepalive_expiry=parser_server.header_timeout_s)
        headers = {"Authorization": f"Bearer {parser_server.key()}"}
        outcomes = []
        with httpx.Client(limits=limits, trust_env=False, timeout=10) as c:
            for _ in range(3):
                for _ in range(2):
                    try:
                        outcomes.append(str(c.get(f"{parser_server.url}/ping", headers=headers).status_code))
                    except httpx.TransportError as e:
                        outcomes.append(f"transport error: {type(e).__name__}")
                time.sleep(gap)
        return outcomes

    with concurrent.futures.ThreadPoolExecutor(len(gaps)) as pool:
        outcomes = [o for run in pool.map(burst_gap_burst, gaps) for o in run]
    assert outcomes.count("200") == len(outcomes), sorted(set(outcomes))


def _program_top1(program_path, images) -> np.ndarray:
    """The ExecuTorch program's top-1 on raw test images, run in this process."""
    return predictor.load(program_path, threads=1).run(data.preprocess(images).numpy()).argmax(1)


def test_runtime_executorch_serves_the_int8_program_like_in_process_and_refuses_changed_bytes(program_path, tmp_path):
    """``--runtime executorch`` on lesson 04b's choice: the same top-1 as the program in this process on real
    test images (batches of 1 to 8); a copy of the program with one byte changed is refused at start (card sha256)."""
    images, _ = data.raw_split("test", 48)
    reference = _program_top1(program_path, images)
    with asgi.AsgiServer(program_path, runtime="executorch", max_batch=8) as server, server.client() as c:
        par = load.served_parity(c, "student", images, reference, concurrency=8, progress=False)
        assert server.stats()["runtime"] == "executorch"
    assert par["statuses"] == {200: 48} and par["agreement"] == 1.0
    changed = tmp_path / program_path.name
    raw = bytearray(program_path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    changed.write_bytes(bytes(raw))
    (tmp_path / export.card_path(program_path).name).write_bytes(export.card_path(program_path).read_bytes())
    with pytest.raises(ServeError, match="sha256"):
        asgi.AsgiServer(changed, runtime="executorch", start_timeout_s=60).start()


def test_the_runtime_must_match_the_file_and_a_program_splits_batches_above_its_bound(program_path, onnx_path):
    """A runtime that cannot run the file is a ValueError naming the choices, before any process starts; a batch above
    the program's planned bound (its card's max_batch) runs in chunks with the same answers."""
    with pytest.raises(ValueError, match="onnxruntime, executorch"):
        predictor.load(onnx_path, runtime="tensorrt")
    with pytest.raises(ValueError, match="student_fp32.onnx: .onnx files need 'onnxruntime'"):
        asgi.AsgiServer(onnx_path, runtime="executorch")
    assert predictor.load(onnx_path).runtime == "onnxruntime"
    program = predictor.load(program_path, threads=1)
    x = data.preprocess(data.raw_split("test", program.max_batch + 8)[0]).numpy()
    whole = program.run(x)
    assert program.runtime == "executorch" and program.card["format"] == "pte" and whole.shape == (len(x), 10)
    assert np.array_equal(whole[: program.max_batch], program.run(x[: program.max_batch]))
    assert np.array_equal(whole[program.max_batch :], program.run(x[program.max_batch :]))
