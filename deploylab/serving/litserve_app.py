"""The student on LitServe: a maintained small server with dynamic batching, behind the course's HTTP door.

LitServe (Lightning AI) runs a :class:`litserve.LitAPI` in inference worker processes and its
FastAPI app in API-server processes; requests cross between them through queues, so only
picklable values travel. The course's door therefore runs *in the API server, before LitServe*:

- :class:`HttpDoor` -- a pure ASGI middleware: the bearer check on every route (401), the bounded
  body read of :mod:`~deploylab.serving.http_input` (413/408), :func:`~deploylab.serving.protocol.decode_http`
  (every bad input a 4xx), load shedding (503 with ``Retry-After``); a valid request reaches LitServe
  as JSON ``{"pixels": [[...]]}``. ``GET /ping`` answers as the other servers do, from LitServe's ``/health``.
- :class:`StudentAPI` -- the LitAPI: the model loaded in ``setup`` (in the worker) by
  :func:`~deploylab.serving.predictor.load` (ONNX Runtime or ExecuTorch, ``--runtime``), LitServe's
  dynamic batching (``max_batch_size``, ``batch_timeout``), one model call per batch.

``python -m deploylab.serving.litserve_app --model student.onnx --port 8080 --key-file key.json``
starts it; :class:`LitServeServer` does so from a notebook or a test and stops every process again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np

from . import protocol
from .asgi import LOOPBACK, MAX_QUEUE, RETRY_AFTER_S, AsgiServer, server_arguments, write_key_file
from .batching_policy import MAX_BATCH, MAX_WAIT_MS
from .header_timeout import KEEP_ALIVE_S, header_timeout_protocol
from .http_input import BODY_TIMEOUT_S, MAX_REQUEST_BYTES, UNAUTHORIZED, authorized, error_body, expected_header, read_chunks
from .processes import forget_at_exit, port_in_use, stop_at_exit

MODEL_NAME = "student"


async def _send_json(send, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": code, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def _body_chunks(receive):
    """The ASGI ``http.request`` messages' bodies, as an async iterator (for :func:`read_chunks`)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise protocol.BadRequest("the client went away before sending the whole body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


class HttpDoor:
    """Pure ASGI middleware in front of LitServe's app (one instance per API-server process)."""

    def __init__(self, app, *, key: str, model_name: str = MODEL_NAME, max_request_bytes: int = MAX_REQUEST_BYTES,
                 body_timeout_s: float = BODY_TIMEOUT_S, max_in_flight: int = MAX_QUEUE):
        self.app, self.expected, self.path = app, expected_header(key), f"/predictions/{model_name}"
        self.max_request_bytes, self.body_timeout_s, self.max_in_flight = max_request_bytes, body_timeout_s, max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not authorized(headers, self.expected):  # every route, before a byte of the body is read
            return await _send_json(send, 401, error_body(401, UNAUTHORIZED))
        if scope["path"] == "/ping" and scope["method"] == "GET":
            return await self._ping(scope, receive, send)
        if scope["path"] == "/stats" and scope["method"] == "GET":  # as the custom server's: what this process imported
            stats = {"pid": os.getpid(), "modules": sorted({m.split(".")[0] for m in sys.modules})}
            return await _send_json(send, 200, json.dumps(stats).encode())
        if scope["path"] != self.path or scope["method"] != "POST":
            return await _send_json(send, 404, error_body(404, f"no route {scope['method']} {scope['path']}; "
                                                              f"this server serves POST {self.path}"))
        if self.in_flight >= self.max_in_flight:
            return await _send_json(send, 503, error_body(503, f"server busy: {self.in_flight} requests in flight; "
                                                               f"retry after {RETRY_AFTER_S} s"), {"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        try:
            await self._predict(scope, receive, send, headers)
        finally:
            self.in_flight -= 1

    async def _predict(self, scope, receive, send, headers: dict[str, str]) -> None:
        try:
            body = await read_chunks(_body_chunks(receive), headers.get("content-length"), self.max_request_bytes,
                                     self.body_timeout_s)
            pixels = await asyncio.to_thread(protocol.decode_http, body, headers.get("content-type"))
        except protocol.BadRequest as e:
            return await _send_json(send, e.code, e.body().encode())
        replay = json.dumps({"pixels": pixels.tolist()}).encode()
        hdrs = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        hdrs += [(b"content-type", b"application/json"), (b"content-length", str(len(replay)).encode())]
        sent = False

        async def replayed():
            nonlocal sent
            if sent:  # LitServe may watch for a disconnect afterwards
                return await receive()
            sent = True
            return {"type": "http.request", "body": replay, "more_body": False}

        await self.app({**scope, "headers": hdrs}, replayed, send)

    async def _ping(self, scope, receive, send) -> None:
        """TorchServe's ``/ping`` from LitServe's ``/health`` (200 only when every worker is ready)."""
        status: dict[str, int] = {}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]

        await self.app({**scope, "path": "/health", "raw_path": b"/health"}, receive, capture)
        if status.get("code") == 200:
            return await _send_json(send, 200, b'{"status": "Healthy"}')
        await _send_json(send, 503, error_body(503, "LitServe's workers are not ready"), {"Retry-After": str(RETRY_AFTER_S)})


class StudentAPI(ls.LitAPI):
    """The LitAPI serving the student with LitServe's dynamic batching (one model call per batch)."""

    def __init__(self, model_path: str | os.PathLike, *, runtime: str | None = None, max_batch: int = 16, max_wait_ms: float = 5.0,
                 top_k: int = 3):
        super().__init__(api_path=f"/predictions/{MODEL_NAME}", max_batch_size=max_batch, batch_timeout=max_wait_ms / 1000.0)
        self.model_path, self.runtime, self.top_k = str(model_path), runtime, top_k

    def setup(self, device) -> None:  # in the inference worker: the API object is pickled there, a loaded model is not
        from . import predictor

        self.model = predictor.load(self.model_path, runtime=self.runtime, threads=1)  # sha256 checked against the model card

    def decode_request(self, request: dict) -> np.ndarray:  # already validated by HttpDoor
        return protocol.model_input(np.asarray(request["pixels"], dtype=np.uint8))

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)  # (1, 1, 32, 32) each -> (N, 1, 32, 32); the default would stack a new axis

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.run(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, logits: np.ndarray) -> dict[str, Any]:
        return protocol.top_k(logits[None, :], self.top_k)[0]


def main(argv: list[str] | None = None) -> None:
    """``python -m deploylab.serving.litserve_app --model student_fp32.onnx --port 8080 --key-file key.json``"""
    p = server_arguments(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1, help="inference worker processes")
    p.add_argument("--fast-queue", action=argparse.BooleanOptionalAction, default=True,
                   help="ZeroMQ between API server and workers (LitServe's default is multiprocessing manager queues)")
    p.add_argument("--tmp-dir", help="the temporary folder of this server and its children (LitServe's multiprocessing "
                   "manager makes a pymp-* folder with a listener socket there); LitServeServer removes it on stop")
    a = p.parse_args(argv)
    if a.tmp_dir:  # before LitServe starts anything: the children inherit TMPDIR, this process reads tempfile.tempdir
        Path(a.tmp_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["TMPDIR"] = tempfile.tempdir = a.tmp_dir
    if a.host not in LOOPBACK or a.host == "localhost":
        raise SystemExit(f"refusing to bind {a.host}: this server binds 127.0.0.1 (or ::) only")
    if port_in_use(a.port, a.host):  # LitServe would start its workers first and then fail with a traceback
        raise SystemExit(f"port {a.port} is already in use on {a.host}: stop what listens there or choose another --port")
    key = write_key_file(a.key_file)
    try:
        server = ls.LitServer(StudentAPI(a.model, runtime=a.runtime, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms), accelerator="cpu",
                              workers_per_device=a.workers, disable_openapi_url=True, fast_queue=a.fast_queue,
                              middlewares=[(HttpDoor, {"key": key, "body_timeout_s": a.body_timeout_s})])
        server.run(host=a.host, port=a.port, num_api_servers=1, generate_client_file=False, log_level="warning",
                   access_log=False, http=header_timeout_protocol(a.header_timeout_s, a.http),
                   timeout_keep_alive=a.keep_alive_s)  # uvicorn's default 5 s equals httpx's keepalive_expiry: a race
    finally:
        Path(a.key_file).unlink(missing_ok=True)  # the key dies with the server


class LitServeServer(AsgiServer):
    """:func:`main` as a subprocess in its own process group, started and stopped as :class:`AsgiServer` is.

    LitServe installs no SIGTERM handler; the group-wide SIGTERM (then SIGKILL) of
    :class:`~deploylab.serving.processes.ServerProcess` reaches its API server, worker and manager processes alike.
    A process killed that way cleans nothing up, so the server's temporary files (the ``pymp-*``
    folder of its multiprocessing manager, with a listener socket) go to its own :attr:`tmp_dir`
    under the workdir, which :meth:`stop` removes.
    """

    def __init__(self, model_path: str | os.PathLike, *, runtime: str | None = None, max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS, workers: int = 1, workdir: str | os.PathLike | None = None,
                 start_timeout_s: float = 90.0, keep_alive_s: int = KEEP_ALIVE_S):
        super().__init__(model_path, runtime=runtime, max_batch=max_batch, max_wait_ms=max_wait_ms, workdir=workdir,
                         start_timeout_s=start_timeout_s)
        self.workers, self.keep_alive_s = workers, keep_alive_s
        self.process.name = "the LitServe server"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "deploylab.serving.litserve_app", "--model", str(self.model_path), "--port", str(self.port),
                "--key-file", str(self.key_file), "--max-batch", str(self.max_batch), "--max-wait-ms", str(self.max_wait_ms),
                "--workers", str(self.workers), "--body-timeout-s", str(self.body_timeout_s),
                "--header-timeout-s", str(self.header_timeout_s), "--keep-alive-s", str(self.keep_alive_s),
                "--tmp-dir", str(self.tmp_dir)] + self.runtime_args()

    @property
    def tmp_dir(self) -> Path:
        return self.workdir / "tmp"

    def start(self) -> "LitServeServer":
        super().start()
        stop_at_exit(self)  # newer than its process: at exit too, the temporary folder goes with it
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every process of the server (raises if one survives), then remove its temporary folder."""
        try:
            super().stop(timeout_s)
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            forget_at_exit(self)


if __name__ == "__main__":
    main()
