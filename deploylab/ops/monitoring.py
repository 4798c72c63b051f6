"""Lesson 09's plumbing around Prometheus: its sizes, load in phases, the alert watcher, the metrics' own cost.

- :data:`SIZES` -- how long each load phase runs and the windows of the lesson's scaled rules, per profile;
- :func:`load_phases` -- open-loop load (:mod:`deploylab.serving.loadgen`) at a sequence of offered
  rates, each phase's wall-clock span kept so that PromQL can ask about exactly that span;
- :class:`AlertWatcher` -- a thread that polls Prometheus' alerts API and records when an alert went
  pending, fired and resolved;
- :func:`metrics_overhead` -- the CPU time the server's metrics add to one request, measured in process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
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


def _unix(rfc3339: str) -> float:
    """Prometheus' RFC 3339 time (nanoseconds, 'Z') as Unix seconds."""
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(head).replace(tzinfo=timezone.utc).timestamp() + (float(f"0.{frac}") if frac else 0.0)


@dataclass
class AlertWatcher:
    """Polls ``prom.alerts()`` every ``poll_s`` in a thread and keeps each alert's state at each poll.

    :meth:`times` says when an alert went pending (Prometheus' own ``activeAt``), fired (the first poll
    that saw it firing) and resolved (the first poll, after it fired, that found it gone).
    """

    prom: Prometheus
    poll_s: float = 0.25
    polls: list[tuple[float, dict[str, str]]] = field(default_factory=list)  # (Unix time, {alertname: state})
    active_at: dict[str, list[float]] = field(default_factory=dict)  # alertname -> each activeAt seen
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
                alerts = self.prom.alerts()
            except Exception:  # a failed poll is a gap in the record, not the end of the watch
                alerts = None
            if alerts is not None:
                self.polls.append((now, {a["labels"]["alertname"]: a["state"] for a in alerts}))
                for a in alerts:
                    seen = self.active_at.setdefault(a["labels"]["alertname"], [])
                    if _unix(a["activeAt"]) not in seen:
                        seen.append(_unix(a["activeAt"]))
            self._stop.wait(self.poll_s)

    def state(self, alertname: str) -> str:
        """``alertname``'s state at the last poll: inactive, pending or firing."""
        return self.polls[-1][1].get(alertname, "inactive") if self.polls else "inactive"

    def fired(self, alertname: str) -> bool:
        return any(states.get(alertname) == "firing" for _, states in self.polls)

    def resolved(self, alertname: str) -> bool:
        """It fired, and a later poll found it gone."""
        return self.times(alertname)["resolved"] is not None

    def times(self, alertname: str, since: float = 0.0) -> dict[str, float | None]:
        """Unix times after ``since``: ``pending`` (activeAt), ``firing`` (first poll seen firing),
        ``resolved`` (first poll after that without it); None where not seen."""
        firing = next((t for t, s in self.polls if t >= since and s.get(alertname) == "firing"), None)
        starts = [t for t in self.active_at.get(alertname, []) if t >= since - 60 and (firing is None or t <= firing)]
        pending = max(starts) if starts else next((t for t, s in self.polls if t >= since and s.get(alertname) == "pending"), None)
        resolved = None if firing is None else next((t for t, s in self.polls if t > firing and alertname not in s), None)
        return {"pending": pending, "firing": firing, "resolved": resolved}


# --------------------------------------------------------------------------------------------
# What the metrics cost
# --------------------------------------------------------------------------------------------


def _drive(coroutine: Any) -> None:
    """Run a coroutine that never waits (its awaits all return at once) to the end, without an event loop
    (a notebook's kernel already runs one in this thread)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("the coroutine waited for something: drive it with an event loop instead")


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

    def calls(app: Callable) -> float:
        t0 = time.process_time()
        for _ in range(requests):
            _drive(app(scope, receive, send))
        return (time.process_time() - t0) / requests * 1e6

    per: dict[str, list[float]] = {"plain": [], "instrumented": []}
    for _ in range(rounds):
        per["plain"].append(calls(plain))
        per["instrumented"].append(calls(wrapped))
    plain_us, inst_us = sorted(per["plain"])[rounds // 2], sorted(per["instrumented"])[rounds // 2]
    return {"plain_us": plain_us, "instrumented_us": inst_us, "overhead_us": inst_us - plain_us}
