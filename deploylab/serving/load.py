"""Load and faults, the same for every server: a recorded load run, a worker killed under load, parity.

- :func:`load_run` -- the closed loop of :mod:`~deploylab.serving.loadgen` for drills, every request
  recorded (send time, status, the first refusal of each status, the 200 answers);
- :func:`fault_run` -- one worker of a server killed (SIGKILL, as the kernel's OOM killer would)
  during a load run, and the time until the server has replaced it;
- :func:`served_parity` -- every image sent once, the served top-1 compared with a reference;
- :func:`inprocess_throughput` -- the in-process ONNX Runtime baseline a server is measured against.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import psutil
from tqdm.auto import tqdm

from .. import bench, config, data, onnxrt
from ..config import Profile
from .api import Client
from .loadgen import LoadgenResult, build_requests, closed_loop
from .processes import ServeError
from .protocol import png_bytes


class HasProcesses(Protocol):
    """A server whose processes can be listed (TorchServe, the container's, the ASGI server)."""

    def processes(self) -> list[psutil.Process]: ...


@dataclass
class LoadResult:
    """One bounded load run: per-request latencies and statuses, and what they add up to."""

    model: str
    concurrency: int
    requests: int
    seconds: float
    statuses: dict[int, int]
    latencies_ms: list[float] = field(repr=False)
    timeline: list[tuple[float, int]] = field(repr=False)  # (start time in s from the run's start, status)
    # the first answer of each status other than 200: what a client was told ("message") and when to retry
    refusals: dict[int, dict[str, str | None]] = field(default_factory=dict, repr=False)
    answers: list[tuple[int, bytes]] = field(default_factory=list, repr=False)  # (request index, body) of each 200

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors_5xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500 or code < 100)

    @property
    def throughput(self) -> float:
        """Successful images per second over the run."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        s = bench.latency_percentiles(self.latencies_ms) if self.latencies_ms else None
        return {"model": self.model, "concurrency": self.concurrency, "requests": self.requests, "ok": self.ok,
                "5xx": self.errors_5xx, "images/s": self.throughput,
                "p50 ms": s.p50_ms if s else None, "p90 ms": s.p90_ms if s else None, "p99 ms": s.p99_ms if s else None}


def from_loadgen(result: LoadgenResult, model: str) -> LoadResult:
    """A closed-loop run of :mod:`~deploylab.serving.loadgen` as a :class:`LoadResult` (transport errors as status 0)."""
    statuses = dict(result.statuses)
    if result.transport_errors:
        statuses[0] = statuses.get(0, 0) + sum(result.transport_errors.values())
    refusals = {status: _refusal(raw) for status, raw in result.refusals.items()}
    if result.transport_errors:
        refusals[0] = {"message": ", ".join(f"{k}: {v}" for k, v in result.transport_errors.items()), "retry_after": None}
    return LoadResult(model, result.connections, result.sent, result.seconds, dict(sorted(statuses.items())),
                      list(result.latencies_s * 1e3), sorted(result.timeline), dict(sorted(refusals.items())),
                      result.answers)


def load_run(client: Client, model: str, bodies: Sequence[bytes], *, concurrency: int, requests: int | None,
             max_seconds: float, content_type: str = "image/png", progress: bool = True, desc: str | None = None,
             during: Callable[[float], bool | None] | None = None) -> LoadResult:
    """The closed loop of :mod:`~deploylab.serving.loadgen` for drills: ``concurrency`` connections send
    ``requests`` requests (cycling through ``bodies``) to ``client``'s server, recording each one.

    Bounded twice: by count (``None``: no count limit) and by ``max_seconds``. A transport error (a
    refused or reset connection, no answer in 10 s) counts as status 0 (a failure). ``during(elapsed_s)``
    is called about every 50 ms (the fault drill kills a worker from there); when it returns True the
    run stops sending. Measured figures come from :mod:`~deploylab.serving.scenarios`, not from here.
    """
    if concurrency < 1 or (requests is not None and requests < 1) or not bodies or max_seconds <= 0:
        raise ValueError("need concurrency >= 1, requests >= 1 (or None), max_seconds > 0 and at least one body")
    url = urlsplit(client.inference_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    reqs = build_requests(host, port, f"/predictions/{model}", bodies, token=client.token(), content_type=content_type)
    run = closed_loop(host, port, reqs, connections=concurrency, count=requests, seconds=max_seconds, progress=progress,
                      record=True, during=during, desc=desc or f"{model} x{concurrency}")
    return from_loadgen(run, model)


def _refusal(raw: bytes) -> dict[str, str | None]:
    """What a refusal told the client: the ``message`` of a JSON body (else its text) and its Retry-After."""
    head, _, body = raw.partition(b"\r\n\r\n")
    retry = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"retry-after:")), None)
    try:
        parsed = json.loads(body)
        message = str(parsed.get("message", parsed) if isinstance(parsed, dict) else parsed)
    except ValueError:
        message = body.decode(errors="replace")
    return {"message": message[:200], "retry_after": retry}


@dataclass
class FaultResult:
    """A worker killed during load: what failed and how long until the workers were back."""

    killed_pid: int
    kill_at_s: float
    recovered_s: float | None  # from the kill until every worker was READY again with a new pid (None: never)
    failed_requests: int
    load: LoadResult

    def to_dict(self) -> dict[str, Any]:
        return {"killed_pid": self.killed_pid, "kill_at_s": self.kill_at_s, "recovered_s": self.recovered_s,
                "failed_requests": self.failed_requests, "requests": self.load.requests,
                "statuses": self.load.statuses, "images/s": self.load.throughput}


def fault_run(server: HasProcesses, client: Client, model: str, bodies: Sequence[bytes], *, concurrency: int = 8,
              max_seconds: float = 30.0, kill_after_s: float = 1.0, settle_s: float = 1.0,
              progress: bool = True) -> FaultResult:
    """Kill one worker (SIGKILL, as the kernel's OOM killer would) ``kill_after_s`` into a load run.

    TorchServe's frontend notices the dead worker and starts a new one. Recovery time is measured
    from the kill until the management API shows as many READY workers as before, none of them the
    killed pid. The load goes on meanwhile (every non-200 answer counts as failed) and stops
    ``settle_s`` after recovery, or after ``max_seconds``.
    """
    before = client.worker_pids(model)
    n_before = client.ready_workers(model)
    if not before:
        raise ServeError(f"model {model!r} has no worker to kill")
    victim = before[0]
    if victim not in {p.pid for p in server.processes()}:
        raise ServeError(f"worker pid {victim} is not a child of this TorchServe; refusing to kill it")
    killed_at, recovered, load = kill_under_load(
        client, model, bodies, victim,
        lambda: sum(w.get("status") == "READY" and w.get("pid") != victim
                    for w in client.describe(model).get("workers", [])) >= n_before,
        concurrency=concurrency, max_seconds=max_seconds, kill_after_s=kill_after_s, settle_s=settle_s, progress=progress,
        desc=f"{model} x{concurrency}, one worker killed")
    return FaultResult(victim, killed_at, recovered, load.requests - load.ok, load)


def kill_under_load(client: Any, model: str, bodies: Sequence[bytes], victim: int, recovered: Callable[[], bool], *,
                    concurrency: int, max_seconds: float, kill_after_s: float = 1.0, settle_s: float = 1.0,
                    progress: bool = True, desc: str | None = None) -> tuple[float, float | None, LoadResult]:
    """SIGKILL process ``victim`` ``kill_after_s`` into a load run, then poll ``recovered()`` until it is true.

    Returns (kill time, seconds from the kill until recovered -- None if never --, the load run). The
    run goes on meanwhile and stops ``settle_s`` after recovery, or after ``max_seconds``. ``client``
    is anything with :meth:`Client.predict`.
    """
    state: dict[str, float | None] = {"killed": None, "recovered": None}

    def during(elapsed: float) -> bool:
        if state["killed"] is None:
            if elapsed >= kill_after_s:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(victim).kill()
                state["killed"] = elapsed
        elif state["recovered"] is None:
            with contextlib.suppress(Exception):
                if recovered():
                    state["recovered"] = elapsed
        return state["recovered"] is not None and elapsed >= state["recovered"] + settle_s

    load = load_run(client, model, bodies, concurrency=concurrency, requests=None, max_seconds=max_seconds,
                    progress=progress, desc=desc, during=during)
    if state["killed"] is None:
        raise ServeError(f"the load run ended before pid {victim} was killed at {kill_after_s} s")
    after = None if state["recovered"] is None else state["recovered"] - state["killed"]
    return state["killed"], after, load


def inprocess_throughput(onnx_path: str | os.PathLike, images: np.ndarray, profile: Profile,
                         threads: int = config.BENCH_THREADS) -> Any:
    """Latency stats of in-process ONNX Runtime at batch 32 on real images (``bench.compare_latency``)."""
    sess = onnxrt.session(onnx_path, threads=threads)
    x = data.preprocess(images[:32])
    res = bench.compare_latency({"onnxruntime in-process": onnxrt.as_callable(sess)}, bench.example_inputs(x, (32,)),
                                profile=profile, progress=False)
    return res["onnxruntime in-process"][32]


def served_parity(client: Client, model: str, images: np.ndarray, reference_top1: np.ndarray, *,
                  concurrency: int = 8, progress: bool = True) -> dict[str, Any]:
    """Send every image (PNG) and compare the served top-1 with ``reference_top1``."""
    if len(images) != len(reference_top1):
        raise ValueError(f"{len(images)} images for {len(reference_top1)} reference labels")
    bodies = [png_bytes(im) for im in images]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        served = list(tqdm(pool.map(lambda b: client.predict(model, b, "image/png"), bodies), total=len(bodies),
                           desc="served parity", unit="img", disable=not progress, leave=False))
    statuses = Counter(r.status_code for r in served)
    top1 = np.array([r.json()["predictions"][0]["index"] if r.status_code == 200 else -1 for r in served])
    return {"images": len(images), "statuses": dict(statuses), "served_top1": top1,
            "agreement": float((top1 == np.asarray(reference_top1)).mean())}
