"""A custom model server: Starlette on uvicorn, the runtime lesson 04b chose, micro-batching -- and a local function host.

One small ASGI app that you own end to end (lesson 07), in two modes:

- ``batch`` (the custom server): every request is decoded and validated on its own
  (:mod:`deploylab.serving.protocol`, the same code as the TorchServe handler and the serverless function),
  then queued; a :class:`MicroBatcher` takes up to ``max_batch`` queued inputs -- waiting at most
  ``max_wait_ms`` for more when the queue runs dry -- and makes ONE model call per batch in a
  worker thread, so the event loop keeps accepting requests while the model runs. The model is
  :func:`deploylab.serving.predictor.load`'s: ONNX Runtime for a ``.onnx`` file, ExecuTorch for a
  ``.pte`` program (``--runtime``), its sha256 checked against its card either way.
- ``function``: a local stand-in for a cloud function's HTTP front door (what AWS's Runtime Interface
  Emulator or ``sam local`` do): each request becomes an API-Gateway event for
  :func:`deploylab.serving.serverless.handler`, run one at a time, as one function instance runs them.

Both modes speak TorchServe's URLs (``GET /ping``, ``POST /predictions/<model>``) so that
:class:`deploylab.serving.api.Client` and :func:`deploylab.serving.load.load_run` drive all servers with the same
code, bind 127.0.0.1 only, and require a bearer token that the server generates at start and writes to
a key file readable by its owner only (0600), as TorchServe's ``key_file.json``.

:class:`AsgiServer` starts the app as a subprocess in its own process group and stops it leaving
nothing behind (also at interpreter exit), through :class:`deploylab.serving.processes.ServerProcess`.
With ``processes=N`` it runs N worker processes on one socket (uvicorn's ``--workers``: a supervisor
that restarts a worker that dies), each with its own event loop, model and
micro-batcher -- one process per core, so that HTTP parsing and PNG decoding are no longer bound to
one GIL. The workers read the bearer key from the key file the supervisor wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import config
from ..files import atomic_write_json
from . import metrics, predictor, protocol, serverless
from .api import Client
from .batching_policy import MAX_BATCH, MAX_WAIT_MS
from .header_timeout import DEFAULT_HTTP, HEADER_TIMEOUT_S, HTTP_PARSERS, KEEP_ALIVE_S, header_timeout_protocol
from .http_input import BODY_TIMEOUT_S, MAX_REQUEST_BYTES, UNAUTHORIZED, authorized, error_response, expected_header, read_body
from .processes import ServeError, ServerProcess, free_ports
from .protocol import BadRequest
from .server_options import LOOPBACK, server_arguments, write_key_file  # noqa: F401 (imported from here by the other servers)


@dataclass(frozen=True)
class LessonSizes:
    """Lesson-07 sizes per profile (the code path is the same in every profile)."""

    parity_images: int | None  # real test images sent to every server and compared with ONNX Runtime (None: all 10,000)
    load_requests: int  # requests per load run (one run per server and concurrency)
    load_seconds: float  # a load run stops after this long even if requests remain
    cold_repeats: int  # fresh processes for the serverless cold start
    concurrency: tuple[int, ...] = (1, 8, 32)
    max_batch: int = MAX_BATCH  # micro-batching of the custom server, and TorchServe's batchSize (batching_policy)
    max_wait_ms: float = float(MAX_WAIT_MS)
    workers: int = 2  # TorchServe's Python workers (1 ONNX Runtime thread each), and the custom server's processes
    rounds: int = 3  # interleaved rounds of the custom-server-vs-TorchServe comparison (odd: the median is a run)


SIZES: dict[str, LessonSizes] = {
    "smoke": LessonSizes(parity_images=64, load_requests=96, load_seconds=4.0, cold_repeats=3, rounds=1),
    "workshop": LessonSizes(parity_images=None, load_requests=800, load_seconds=10.0, cold_repeats=5),
    "full": LessonSizes(parity_images=None, load_requests=3_000, load_seconds=30.0, cold_repeats=10),
}


def sizes(profile: "config.Profile") -> LessonSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


MODES = ("batch", "function")
MAX_QUEUE = 256  # inputs waiting for the model before new ones are shed with 503 (about 1 s of work on 2 cores)
RETRY_AFTER_S = 1


# --------------------------------------------------------------------------------------------
# Micro-batching
# --------------------------------------------------------------------------------------------


class Overloaded(RuntimeError):
    """The queue is full: the request is shed with 503 and ``Retry-After``."""


class MicroBatcher:
    """Queue single inputs; run them in batches of up to ``max_batch``, one model call per batch.

    A batch starts as soon as the model is free and something is queued; if fewer than
    ``max_batch`` inputs wait and other requests are still being read and decoded (``arriving``), it
    waits up to ``max_wait_ms`` for them -- a lone request runs at once. While a batch runs (in one
    worker thread: ONNX Runtime releases the GIL), new requests queue up, so under load the next
    batch is usually full without any waiting.
    """

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], *, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
                 max_queue: int = MAX_QUEUE):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0 and max_queue >= 1, got {max_batch}, {max_wait_ms}, {max_queue}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batch_sizes: Counter = Counter()
        self.arriving = 0  # requests accepted but not yet queued (reading/decoding): worth waiting for
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Queue one preprocessed input ``(1, ...)``; returns its row of the model's output ``(1, classes)``.

        Raises :class:`Overloaded` when ``max_queue`` inputs already wait: shedding load on purpose
        (an honest 503 with ``Retry-After``) rather than queueing without bound.
        """
        if self.queue.qsize() >= self.max_queue:
            raise Overloaded(f"server busy: {self.queue.qsize()} requests are queued (the limit is {self.max_queue}); "
                             f"retry after {RETRY_AFTER_S} s")
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(items) < self.max_batch:
            try:
                items.append(self.queue.get_nowait())  # already waiting: take it without delay
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0 or self.arriving == 0:  # nobody else on the way: do not make this batch wait
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            items = [(x, f) for x, f in items if not f.cancelled()]  # clients that went away
            if not items:
                continue
            self.batch_sizes[len(items)] += 1
            try:
                out = await loop.run_in_executor(self.executor, self.run_batch, np.concatenate([x for x, _ in items]))
            except Exception as e:  # the model failed: every waiting request learns it (a 500, logged by uvicorn)
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            for i, (_, f) in enumerate(items):
                if not f.done():
                    f.set_result(out[i : i + 1])


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def create_app(model_path: str | os.PathLike, *, key: str, mode: str = "batch", model_name: str = "student", runtime: str | None = None,
               max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS, threads: int = 1, top_k: int = 3,
               max_request_bytes: int = MAX_REQUEST_BYTES, body_timeout_s: float = BODY_TIMEOUT_S,
               stats_dir: str | os.PathLike | None = None, prometheus: bool = False) -> Callable:
    """The Starlette app (see the module docstring). ``key`` is the bearer token every request must carry.

    With ``stats_dir``, the process writes its statistics (:func:`worker_stats`) to
    ``stats_dir/worker-<pid>.json`` when it shuts down (and ``ready-<pid>`` once its model is loaded):
    with several worker processes, ``/stats`` answers for whichever worker took the connection, the
    files for all of them. With ``prometheus``, ``GET /metrics`` answers Prometheus (:mod:`.metrics`, lesson 09).
    ``runtime``: what runs the model (:data:`~deploylab.serving.predictor.RUNTIMES`; None: from the file's suffix).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    predictor.runtime_for(model_path, runtime)  # a wrong runtime fails here, not in the lifespan
    expected = expected_header(key)
    state: dict[str, Any] = {}
    monitor = metrics.ServerMetrics() if prometheus else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if mode == "batch":
            model = predictor.load(model_path, runtime=runtime, threads=threads)  # sha256 checked against the card
            state["batcher"] = MicroBatcher(model.run, max_batch=max_batch, max_wait_ms=max_wait_ms)
            if monitor:
                monitor.watch(state["batcher"])
            state["batcher"].start()
        else:
            serverless.configure(model_path, threads=threads, runtime=runtime)
            serverless.model()  # a warm instance: the cold start is measured separately (serverless.cold_start)
            state["executor"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="function")
        if stats_dir is not None:
            (Path(stats_dir) / f"ready-{os.getpid()}").touch()  # this process has its model: AsgiServer counts these
        yield
        if mode == "batch":
            await state["batcher"].stop()
        else:
            state["executor"].shutdown(wait=False, cancel_futures=True)
        if stats_dir is not None:
            atomic_write_json(Path(stats_dir) / f"worker-{os.getpid()}.json", worker_stats())

    def worker_stats() -> dict[str, Any]:
        """This process: its mode, runtime and pid, the batch sizes its micro-batcher formed, the top-level modules imported."""
        b = state.get("batcher")
        return {"mode": mode, "runtime": predictor.runtime_for(model_path, runtime), "pid": os.getpid(),
                "batch_sizes": dict(b.batch_sizes) if b else {},
                "modules": sorted({m.split(".")[0] for m in sys.modules})}

    async def ping(request):
        if not authorized(request.headers, expected):
            return error_response(401, UNAUTHORIZED)
        return JSONResponse({"status": "Healthy"})

    async def stats(request):
        if not authorized(request.headers, expected):
            return error_response(401, UNAUTHORIZED)
        return JSONResponse(worker_stats())

    async def predict(request):
        if not authorized(request.headers, expected):
            return error_response(401, UNAUTHORIZED)
        if request.path_params["model"] != model_name:
            return error_response(404, f"no model {request.path_params['model']!r}; this server serves {model_name!r}")
        if mode == "function":
            try:
                body = await read_body(request, max_request_bytes, body_timeout_s)
            except BadRequest as e:
                return Response(e.body(), status_code=e.code, media_type="application/json")
            event = serverless.event_from_body(body, request.headers.get("content-type"))
            answer = await asyncio.get_running_loop().run_in_executor(state["executor"], serverless.handler, event, None)
            return Response(answer["body"], status_code=answer["statusCode"], media_type="application/json")
        batcher = state["batcher"]
        batcher.arriving += 1
        try:
            body = await read_body(request, max_request_bytes, body_timeout_s)
            x = protocol.model_input(protocol.decode_http(body, request.headers.get("content-type")))
        except BadRequest as e:
            return Response(e.body(), status_code=e.code, media_type="application/json")
        finally:
            batcher.arriving -= 1
        try:
            logits = await batcher.submit(x)
        except Overloaded as e:
            return error_response(503, str(e), {"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse(protocol.top_k(logits, top_k)[0])

    routes = [Route("/ping", ping, methods=["GET"]), Route("/stats", stats, methods=["GET"]),
              Route("/predictions/{model}", predict, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    return monitor.instrument(app, expected) if monitor else app


WORKER_ENV = "DEPLOYLAB_ASGI_WORKER"  # the settings a worker process reads (JSON), set by the supervisor


def app_from_environment() -> Starlette:
    """The app of one worker process of ``--processes N`` (uvicorn's factory, called in each worker).

    The settings come from :data:`WORKER_ENV`; the key is read from the key file the supervisor
    wrote, so it never appears in a command line or an environment variable.
    """
    torch.set_num_threads(1)
    settings = json.loads(os.environ[WORKER_ENV])
    for name in ("header_timeout_s", "http"):  # for WorkerProtocol, not the app
        settings.pop(name)
    key = json.loads(Path(settings.pop("key_file")).read_text())["inference"]["key"]
    return create_app(key=key, **settings)


# uvicorn's ``http=`` for the workers of ``--processes N``: each worker imports this module with
# WORKER_ENV already set by the supervisor, so the class carries the worker's header timeout and parser.
_WORKER = json.loads(os.environ.get(WORKER_ENV, "{}"))
WorkerProtocol = header_timeout_protocol(float(_WORKER.get("header_timeout_s", HEADER_TIMEOUT_S)), _WORKER.get("http", DEFAULT_HTTP))


def main(argv: list[str] | None = None) -> None:
    """``python -m deploylab.serving.asgi --model student_fp32.onnx --port 8080 --key-file key.json [--processes 2]``"""
    p = server_arguments(__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES, default="batch")
    p.add_argument("--model-name", default="student")
    p.add_argument("--threads", type=int, default=1, help="the runtime's intra-op threads (per process)")
    p.add_argument("--processes", type=int, default=1, help="worker processes on the one socket (one per core)")
    p.add_argument("--stats-dir", help="each process writes its statistics here when it stops")
    p.add_argument("--metrics", action="store_true", help="GET /metrics for Prometheus (several processes: multiprocess mode)")
    a = p.parse_args(argv)
    if a.host not in LOOPBACK:
        raise SystemExit(f"refusing to bind {a.host}: this server binds loopback only ({', '.join(LOOPBACK)})")
    if a.processes < 1:
        raise SystemExit(f"--processes must be >= 1, got {a.processes}")
    torch.set_num_threads(1)  # data.preprocess of one image: no thread pool fighting the model's for the cores
    key = write_key_file(a.key_file)
    settings = dict(model_path=a.model, runtime=a.runtime, mode=a.mode, model_name=a.model_name, max_batch=a.max_batch,
                    max_wait_ms=a.max_wait_ms, threads=a.threads, body_timeout_s=a.body_timeout_s, stats_dir=a.stats_dir,
                    prometheus=a.metrics)
    try:
        if a.processes == 1:
            uvicorn.run(create_app(key=key, **settings), host=a.host, port=a.port, log_level="warning", access_log=False,
                        workers=1, http=header_timeout_protocol(a.header_timeout_s, a.http), timeout_keep_alive=a.keep_alive_s)
        else:  # uvicorn's supervisor spawns the workers: they build the app from WORKER_ENV
            if a.metrics:  # before the workers import prometheus_client: they share one folder of values
                os.environ.update(metrics.multiprocess_environment(Path(a.stats_dir or tempfile.mkdtemp()) / "prometheus"))
            os.environ[WORKER_ENV] = json.dumps({**settings, "key_file": a.key_file, "header_timeout_s": a.header_timeout_s,
                                                 "http": a.http})
            uvicorn.run("deploylab.serving.asgi:app_from_environment", factory=True, host=a.host, port=a.port,
                        log_level="warning", access_log=False, workers=a.processes,
                        http="deploylab.serving.asgi:WorkerProtocol", timeout_keep_alive=a.keep_alive_s)
    finally:
        Path(a.key_file).unlink(missing_ok=True)  # the key dies with the server


# --------------------------------------------------------------------------------------------
# Start and stop it from a notebook or a test
# --------------------------------------------------------------------------------------------


class AsgiServer:
    """The app of this module as a subprocess in its own process group (a context manager)."""

    def __init__(self, model_path: str | os.PathLike, *, mode: str = "batch", model_name: str = "student", runtime: str | None = None,
                 max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS, threads: int = 1, processes: int = 1,
                 workdir: str | os.PathLike | None = None, start_timeout_s: float = 60.0,
                 body_timeout_s: float = BODY_TIMEOUT_S, header_timeout_s: float = HEADER_TIMEOUT_S, metrics: bool = False,
                 http: str = DEFAULT_HTTP, keep_alive_s: int = KEEP_ALIVE_S):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if processes < 1 or http not in HTTP_PARSERS:
            raise ValueError(f"processes must be >= 1 and http one of {HTTP_PARSERS}, got {processes} and {http!r}")
        self.processes_count = processes
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"no model file {self.model_path}")
        predictor.runtime_for(self.model_path, runtime)  # an unknown or mismatched runtime: a ValueError before any process starts
        self.mode, self.model_name, self.runtime = mode, model_name, runtime
        self.max_batch, self.max_wait_ms, self.threads = max_batch, max_wait_ms, threads
        self.body_timeout_s, self.header_timeout_s, self.metrics = body_timeout_s, header_timeout_s, metrics
        self.http = http  # uvicorn's HTTP parser (header_timeout.HTTP_PARSERS), with the header deadline either way
        self.keep_alive_s = keep_alive_s  # an idle kept-alive connection is closed after this (header_timeout.KEEP_ALIVE_S)
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"deploylab-asgi-{mode}-"))
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.ready_s: float | None = None  # from Popen until /ping answered (model loaded)
        self.process = ServerProcess(f"the ASGI server ({mode})", self.log_file, secrets=[self.key_file])

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def log_file(self) -> Path:
        return self.workdir / "server.log"

    @property
    def stats_dir(self) -> Path:
        return self.workdir / "stats"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "AsgiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "deploylab.serving.asgi", "--model", str(self.model_path), "--port", str(self.port),
                "--key-file", str(self.key_file), "--mode", self.mode, "--model-name", self.model_name,
                "--max-batch", str(self.max_batch), "--max-wait-ms", str(self.max_wait_ms), "--threads", str(self.threads),
                "--body-timeout-s", str(self.body_timeout_s), "--header-timeout-s", str(self.header_timeout_s), "--http", self.http,
                "--processes", str(self.processes_count), "--stats-dir", str(self.stats_dir), "--keep-alive-s", str(self.keep_alive_s),
                *self.runtime_args()] + ["--metrics"] * self.metrics

    def runtime_args(self) -> list[str]:
        """``--runtime NAME`` when one was given (otherwise the server takes it from the model file's suffix)."""
        return ["--runtime", self.runtime] if self.runtime else []

    def start(self) -> "AsgiServer":
        """Launch the server, wait until /ping answers with the generated key; stop it again on any failure."""
        if self.process.proc is not None:
            raise ServeError("this server is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        shutil.rmtree(self.stats_dir, ignore_errors=True)
        self.stats_dir.mkdir()
        self.port = free_ports(1)[0]
        t0 = time.perf_counter()
        self.process.launch(self.command(), cwd=config.ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            self.process.wait_until(self._ready, self.start_timeout_s, poll_s=0.05)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        return self

    def _ready(self) -> bool:
        """The key file is written, /ping answers 200 with it, and every worker process is up."""
        if not self.key_file.is_file():
            return False
        if self.processes_count > 1 and len(list(self.stats_dir.glob("ready-*"))) < self.processes_count:
            return False  # /ping may come from the first worker up: wait until every worker has loaded its model
        try:
            r = httpx.get(f"{self.url}/ping", headers={"Authorization": f"Bearer {self.key()}"}, timeout=2, trust_env=False)
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return r.status_code == 200

    def key(self) -> str:
        """The bearer key the server wrote to its key file."""
        return json.loads(self.key_file.read_text())["inference"]["key"]

    def client(self, timeout_s: float = 30.0, **kwargs: Any) -> Client:
        """An authenticated :class:`~deploylab.serving.api.Client` (the same client as for TorchServe)."""
        return Client(self.url, self.url, self.url, inference_key=self.key(), management_key=self.key(), timeout_s=timeout_s, **kwargs)

    def stats(self) -> dict[str, Any]:
        """``/stats`` of the worker that takes the connection (with several processes: one of them)."""
        return httpx.get(f"{self.url}/stats", headers={"Authorization": f"Bearer {self.key()}"}, trust_env=False).json()

    def final_stats(self) -> dict[str, Any]:
        """After :meth:`stop`: every worker's statistics, merged (batch sizes summed, modules united, pids listed).

        Each worker writes its file when it shuts down; a missing one (a worker killed, not stopped)
        is an error rather than a silently partial count.
        """
        files = sorted(self.stats_dir.glob("worker-*.json"))
        if len(files) < self.processes_count:
            raise ServeError(f"{len(files)} of {self.processes_count} worker statistics in {self.stats_dir}: "
                             "was the server stopped with stop()?")
        parts = [json.loads(f.read_text()) for f in files]
        sizes: Counter = Counter()
        for part in parts:
            sizes.update({int(k): v for k, v in part["batch_sizes"].items()})
        return {"mode": self.mode, "pids": [part["pid"] for part in parts], "batch_sizes": dict(sorted(sizes.items())),
                "modules": sorted(set().union(*(part["modules"] for part in parts)))}

    def processes(self) -> list[psutil.Process]:
        """Live processes of this server (the uvicorn process and any child)."""
        return self.process.processes()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout_s``; deletes the key; raises if a process survives."""
        self.process.stop(timeout_s)

    def tail_log(self, lines: int = 30) -> str:
        return self.process.tail(lines)


if __name__ == "__main__":
    main()
