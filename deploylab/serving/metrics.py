"""Prometheus metrics for the custom ASGI server, in Prometheus' conventions (lesson 09).

:class:`ServerMetrics` holds what the server exposes on ``GET /metrics`` (behind the same bearer
token as every other URL), through ``prometheus_client``:

- ``deploylab_requests_total{code}`` -- answered prediction requests by HTTP status (a counter: ``_total``);
- ``deploylab_request_duration_seconds`` -- a histogram of each prediction request's time in the
  server, from the ASGI call to its last byte (base unit: seconds; a bucket edge at the SLO, 50 ms);
- ``deploylab_requests_in_flight`` -- prediction requests being read, queued or answered now;
- ``deploylab_batch_size`` -- a histogram of the micro-batches the model ran;
- ``deploylab_queue_depth`` -- inputs left waiting when the last batch started;
- ``deploylab_model_run_seconds`` -- a histogram of each batch's model call;
- in one process, ``process_cpu_seconds_total`` and the other process metrics of ``prometheus_client``.

:meth:`ServerMetrics.instrument` wraps the app in a pure ASGI middleware (so :mod:`~deploylab.serving.asgi`
changes by a few lines), :meth:`ServerMetrics.watch` wraps the micro-batcher's model call.

**Several worker processes** (``--processes N``) share one socket: a scrape reaches whichever
worker accepts the connection, so each worker must answer for all of them. That is
``prometheus_client``'s multiprocess mode (:func:`multiprocess_environment`): every worker writes its
values to memory-mapped files in one folder and ``/metrics`` sums them (gauges: ``livesum``, the live
workers only). Per-process ports were the alternative: N scrape targets whose ports change each time
uvicorn's supervisor restarts a worker, so Prometheus would need a service discovery for them.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response

from .http_input import UNAUTHORIZED, error_response

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported: set before any worker starts
# Request durations: fine below the SLO's 50 ms, an edge exactly at it (the latency SLI reads le="0.05").
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64)
MODEL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
PREDICT_PREFIX = "/predictions/"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def multiprocess_environment(folder: str | os.PathLike) -> dict[str, str]:
    """The environment that puts the worker processes started after it in multiprocess mode, writing to ``folder``.

    The folder is created empty (values of a previous run would be summed in).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    return {MULTIPROC_ENV: str(folder)}


def multiprocess_mode() -> bool:
    """This process writes its metrics to a multiprocess folder (set before ``prometheus_client`` was imported)."""
    return MULTIPROC_ENV in os.environ


class ServerMetrics:
    """The server's metrics, its ``/metrics`` answer, and the hooks that keep them (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # one per app: two apps in one process (tests) do not collide
        reg = self.registry
        self.requests = Counter("deploylab_requests", "Answered prediction requests, by HTTP status code.", ["code"], registry=reg)
        self.duration = Histogram("deploylab_request_duration_seconds", "Time of a prediction request in the server, "
                                  "from its ASGI call to its last byte sent.", buckets=DURATION_BUCKETS, registry=reg)
        self.in_flight = Gauge("deploylab_requests_in_flight", "Prediction requests being read, queued or answered.",
                               registry=reg, multiprocess_mode="livesum")
        self.batch_size = Histogram("deploylab_batch_size", "Inputs per model call (micro-batch).", buckets=BATCH_BUCKETS, registry=reg)
        self.queue_depth = Gauge("deploylab_queue_depth", "Inputs left waiting when the last batch started.",
                                 registry=reg, multiprocess_mode="livesum")
        self.model_seconds = Histogram("deploylab_model_run_seconds", "Time of one model call (a whole batch).",
                                       buckets=MODEL_BUCKETS, registry=reg)
        if multiprocess_mode():  # scrapes read every worker's files
            self.exposition = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposition)
        else:  # one process: its own CPU time and memory too (process_cpu_seconds_total...)
            ProcessCollector(registry=reg)
            self.exposition = reg

    def text(self) -> bytes:
        """The exposition text a scrape gets."""
        return generate_latest(self.exposition)

    def watch(self, batcher: Any) -> None:
        """Time each model call of ``batcher`` (a :class:`~deploylab.serving.asgi.MicroBatcher`) and note the
        batch size and the inputs still queued (the model thread calls this; the metrics are thread-safe)."""
        run_batch = batcher.run_batch

        def observed(x: Any) -> Any:
            self.queue_depth.set(batcher.queue.qsize())
            self.batch_size.observe(len(x))
            t0 = time.perf_counter()
            try:
                return run_batch(x)
            finally:
                self.model_seconds.observe(time.perf_counter() - t0)

        batcher.run_batch = observed

    def instrument(self, app: Callable, expected: bytes) -> Callable:
        """``app`` wrapped: ``GET /metrics`` answered (bearer token ``expected`` required), prediction
        requests counted and timed, everything else passed through untouched."""
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                return await app(scope, receive, self._on_shutdown(send))
            if scope["type"] != "http":
                return await app(scope, receive, send)
            path = scope["path"]
            if path == "/metrics":
                auth = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(auth, expected):
                    return await error_response(401, UNAUTHORIZED)(scope, receive, send)
                if scope["method"] != "GET":
                    return await error_response(405, "GET /metrics only")(scope, receive, send)
                return await Response(self.text(), media_type=CONTENT_TYPE_LATEST)(scope, receive, send)
            if not path.startswith(PREDICT_PREFIX):
                return await app(scope, receive, send)
            await self._timed(app, scope, receive, send)

        return middleware

    async def _timed(self, app: Callable, scope: Scope, receive: Receive, send: Send) -> None:
        """One prediction request: in flight while it runs, its status counted and its duration observed at its last byte."""
        t0 = time.perf_counter()
        status = [500]  # an exception before the answer started: uvicorn answers 500

        async def watching(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.in_flight.inc()
        try:
            await app(scope, receive, watching)
        finally:
            self.in_flight.dec()
            self.requests.labels(str(status[0])).inc()
            self.duration.observe(time.perf_counter() - t0)

    def _on_shutdown(self, send: Send) -> Send:
        """A lifespan ``send`` that, in multiprocess mode, retires this worker's live gauges once it has shut down."""
        async def wrapped(message: dict) -> None:
            if message["type"] == "lifespan.shutdown.complete" and multiprocess_mode():
                multiprocess.mark_process_dead(os.getpid())
            await send(message)

        return wrapped
