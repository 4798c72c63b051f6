"""Lesson 09's plumbing around Prometheus: its sizes, load in phases, the alert watcher, the metrics' own cost.

- :data:`SIZES` -- how long each load phase runs and the windows of the lesson's scaled rules, per profile;
- :func:`load_phases` -- open-loop load (:mod:`deploylab.serving.loadgen`) at a sequence of offered
  rates, each phase's wall-clock span kept so that PromQL can ask about exactly that span;
- :class:`AlertWatcher` -- a thread that polls Prometheus' alerts API and records when an alert went
  pending, fired and resolved;
- :func:`metrics_overhead` -- the CPU time the server's metrics add to one request, measured in process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import config
from ..serving import loadgen
from .prometheus import Prometheus


@dataclass(frozen=True)
class MonitoringSizes:
    """Lesson-09 sizes per profile (the code path is the same in every profile)."""

    interval: str  # Prometheus' scrape and rule-evaluation interval in the lesson
    windows: dict[str, str]  # the committed rules' durations -> the lesson's (scaled_rules)
    ramp: tuple[float, ...]  # offered rates as fractions of the measured capacity
    step_s: float  # seconds per rate of the ramp
    torchserve_s: float  # seconds of load on TorchServe
    overload: float  # offered rate of the alert demo, as a multiple of the capacity
    calm: float  # offered rate after the overload, as a fraction of the capacity
    max_phase_s: float  # longest the alert demo waits for firing, then for resolution
    overhead_requests: int  # in-process requests timed with and without metrics
    capacity_s: float = 1.5  # the closed-loop run that measures the capacity


SIZES: dict[str, MonitoringSizes] = {
    "smoke": MonitoringSizes(interval="1s", windows={"1h": "10s", "5m": "3s", "2m": "2s", "10m": "10s"}, ramp=(0.2, 0.6),
                             step_s=2.0, torchserve_s=2.0, overload=2.5, calm=0.1, max_phase_s=25.0, overhead_requests=5_000),
    "workshop": MonitoringSizes(interval="1s", windows={"1h": "30s", "5m": "6s", "2m": "5s", "10m": "20s"}, ramp=(0.2, 0.4, 0.6, 0.8),
                                step_s=6.0, torchserve_s=6.0, overload=2.5, calm=0.1, max_phase_s=60.0,
                                overhead_requests=30_000, capacity_s=3.0),
    "full": MonitoringSizes(interval="1s", windows={"1h": "60s", "5m": "10s", "2m": "10s", "10m": "30s"}, ramp=(0.2, 0.4, 0.6, 0.8, 0.9),
                            step_s=15.0, torchserve_s=15.0, overload=2.5, calm=0.1, max_phase_s=120.0,
                            overhead_requests=100_000, capacity_s=5.0),
}


def sizes(profile: "config.Profile | str | None" = None) -> MonitoringSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[config.get_profile(profile).name]


# --------------------------------------------------------------------------------------------
# Load in phases
# --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One phase of open-loop load: its offered rate, its wall-clock span (Unix time) and the generator's result."""

    label: str
    rate: float
    start: float
    end: float
    result: loadgen.LoadgenResult


def load_phase(label: str, port: int, requests: Sequence[bytes], rate: float, seconds: float, **kwargs: Any) -> Phase:
    """``seconds`` of Poisson arrivals at ``rate``/s (open loop), with its span in Unix time."""
    start = time.time()
    r = loadgen.open_loop("127.0.0.1", port, requests, rate=rate, count=max(1, round(rate * seconds)), progress=False, **kwargs)
    return Phase(label, rate, start, time.time(), r)


def load_until(label: str, port: int, requests: Sequence[bytes], rate: float, done: Callable[[], bool], max_s: float,
               chunk_s: float = 1.0, **kwargs: Any) -> list[Phase]:
    """Load at ``rate`` in chunks of ``chunk_s`` until ``done()`` or ``max_s``; one :class:`Phase` per chunk."""
    phases: list[Phase] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        phases.append(load_phase(label, port, requests, rate, chunk_s, seed=len(phases), **kwargs))
        if done():
            break
    return phases


# --------------------------------------------------------------------------------------------
# The alerts, watched
# --------------------------------------------------------------------------------------------


@dataclass
class AlertWatcher:
    """Polls ``prom.alerts()`` every ``poll_s`` in a thread; :meth:`times` says when ``alertname`` went
    pending (Prometheus' own ``activeAt``), fired (first poll seen firing) and resolved (first poll,
    after firing, where it is gone)."""

    prom: Prometheus
    alertname: str
    poll_s: float = 0.25
    polls: list[tuple[float, str]] = field(default_factory=list)  # (Unix time, "inactive" | "pending" | "firing")
    active_at: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "AlertWatcher":
        self._thread = threading.Thread(target=self._run, name="alert-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            try:
                mine = [a for a in self.prom.alerts() if a["labels"].get("alertname") == self.alertname]
            except Exception:  # noqa: BLE001 -- a failed poll is a gap in the record, not the end of the watch
                mine = None
            if mine is not None:
                self.polls.append((now, mine[0]["state"] if mine else "inactive"))
                if mine and mine[0]["activeAt"] not in self.active_at:
                    self.active_at.append(mine[0]["activeAt"])
            self._stop.wait(self.poll_s)

    def state(self) -> str:
        """The last state polled."""
        return self.polls[-1][1] if self.polls else "inactive"

    def fired(self) -> bool:
        return any(s == "firing" for _, s in self.polls)

    def resolved(self) -> bool:
        """It fired, and a later poll found it gone."""
        return self.times()["resolved"] is not None

    def times(self) -> dict[str, float | None]:
        """Unix times: ``pending`` (first poll seen pending), ``firing``, ``resolved`` (None: not seen)."""
        pending = next((t for t, s in self.polls if s == "pending"), None)
        firing = next((t for t, s in self.polls if s == "firing"), None)
        resolved = None if firing is None else next((t for t, s in self.polls if t > firing and s == "inactive"), None)
        return {"pending": pending, "firing": firing, "resolved": resolved}


# --------------------------------------------------------------------------------------------
# What the metrics cost
# --------------------------------------------------------------------------------------------


def metrics_overhead(instrument: Callable[[Callable], Callable], requests: int, rounds: int = 5) -> dict[str, float]:
    """CPU microseconds per request that ``instrument`` (e.g. ``ServerMetrics().instrument`` with a key)
    adds to a trivial ASGI app, in this process: the two versions are called ``requests`` times each, in
    ``rounds`` interleaved rounds (plain, instrumented, plain, ...), and the medians are compared."""
    async def plain(scope: dict, receive: Callable, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    wrapped = instrument(plain)
    scope = {"type": "http", "method": "POST", "path": "/predictions/student", "headers": []}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        return None

    async def calls(app: Callable) -> float:
        t0 = time.process_time()
        for _ in range(requests):
            await app(scope, receive, send)
        return (time.process_time() - t0) / requests * 1e6

    per: dict[str, list[float]] = {"plain": [], "instrumented": []}
    loop = asyncio.new_event_loop()
    try:
        for _ in range(rounds):
            per["plain"].append(loop.run_until_complete(calls(plain)))
            per["instrumented"].append(loop.run_until_complete(calls(wrapped)))
    finally:
        loop.close()
    plain_us, inst_us = sorted(per["plain"])[rounds // 2], sorted(per["instrumented"])[rounds // 2]
    return {"plain_us": plain_us, "instrumented_us": inst_us, "overhead_us": inst_us - plain_us}
