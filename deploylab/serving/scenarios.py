"""MLPerf Inference's scenarios for a served model, measured with :mod:`~deploylab.serving.loadgen`, and
what each request costs in CPU.

- **SingleStream** (:func:`single_stream`): one request at a time, the next sent when the answer
  arrives; the metric is the 90th percentile latency.
- **Server** (:func:`server_capacity`): requests arrive as a Poisson process; the metric is the highest
  arrival rate whose 99th percentile latency (from each request's intended send time) stays within
  a latency bound, the SLO, found by a search over offered rates.
- **Offline** (:func:`offline`): all requests available at once; the metric is throughput (closed loop
  at a fixed number of connections).

:func:`cpu_cost` accounts CPU time per served request to each role of a server (frontend, workers,
replicas...) and to the generator, and prices it per million requests at a core-hour price.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import psutil

from .. import config
from .loadgen import LoadgenResult, closed_loop, open_loop
from .processes import cpu_seconds

# The latency bound of the Server scenario: p99 within 50 ms. An interactive request has about 100 ms
# before a person notices a delay; half of it is left for the network and the client. (MLPerf bounds
# ResNet50's p99 at 15 ms in its datacenter Server scenario, on accelerators and dedicated hosts; this
# course runs every server and its load generator on the same 2 CPU cores.)
SLO_MS = 50.0


@dataclass(frozen=True)
class ScenarioSizes:
    """Sizes of the scenario runs per profile (lessons 07 and 08; the code path is the same in every profile)."""

    single_stream: int  # requests of SingleStream
    offline_seconds: float  # the Offline run
    trial_seconds: float  # each trial of the Server search
    min_samples: int  # at least this many requests behind each trial's p99
    steps: int  # at most this many bisection steps of the Server search after its two bounds (it stops at 5%)


SIZES: dict[str, ScenarioSizes] = {
    "smoke": ScenarioSizes(single_stream=40, offline_seconds=0.6, trial_seconds=0.3, min_samples=80, steps=2),
    "workshop": ScenarioSizes(single_stream=1_000, offline_seconds=3.0, trial_seconds=1.5, min_samples=600, steps=7),
    "full": ScenarioSizes(single_stream=3_000, offline_seconds=10.0, trial_seconds=5.0, min_samples=3_000, steps=8),
}


def sizes(profile: "config.Profile") -> ScenarioSizes:
    """The scenario sizes for ``profile``."""
    return SIZES[profile.name]


def single_stream(host: str, port: int, requests: Sequence[bytes], *, count: int, **kwargs) -> LoadgenResult:
    """SingleStream: ``count`` requests one after the other on one connection; read its p90."""
    return closed_loop(host, port, requests, connections=1, count=count, **kwargs)


def offline(host: str, port: int, requests: Sequence[bytes], *, connections: int = 32, seconds: float, **kwargs) -> LoadgenResult:
    """Offline: as many requests as ``connections`` keep in flight, for ``seconds``; read its throughput."""
    return closed_loop(host, port, requests, connections=connections, seconds=seconds, **kwargs)


@dataclass
class ServerScenario:
    """The Server scenario's search: every offered rate tried, and the highest that met the SLO."""

    slo_ms: float
    trials: list[LoadgenResult] = field(default_factory=list)

    @staticmethod
    def met(r: LoadgenResult, slo_ms: float) -> bool:
        """p99 within the SLO, every request answered 200, and the offered rate achieved (within 10%)."""
        return (r.ok == r.sent and r.percentiles_ms()["p99"] <= slo_ms
                and r.achieved_rate >= 0.9 * (r.offered_rate or 0.0))

    @property
    def best(self) -> LoadgenResult | None:
        passing = [t for t in self.trials if self.met(t, self.slo_ms)]
        return max(passing, key=lambda t: t.offered_rate or 0.0) if passing else None

    @property
    def capacity(self) -> float:
        """The highest offered rate (requests/s) that met the SLO; 0 if none did."""
        return (self.best.offered_rate or 0.0) if self.best else 0.0

    @property
    def bracket(self) -> tuple[float, float | None]:
        """(capacity, the lowest rate above it that missed, or None): the capacity is known to within this pair,
        so two capacities whose brackets overlap are not told apart by the search."""
        above = [t.offered_rate or 0.0 for t in self.trials
                 if (t.offered_rate or 0.0) > self.capacity and not self.met(t, self.slo_ms)]
        return self.capacity, (min(above) if above else None)

    def table(self) -> list[dict[str, float | str]]:
        """One row per trial, by offered rate: achieved rate, percentiles with their sample count, met or not."""
        rows = []
        for t in sorted(self.trials, key=lambda t: t.offered_rate or 0.0):
            p = t.percentiles_ms()
            rows.append({"offered/s": t.offered_rate or 0.0, "achieved/s": t.achieved_rate, "p50 ms": p["p50"],
                         "p99 ms": p["p99"], "n": int(p["n"]), "non-200": t.sent - t.ok,
                         "SLO": "met" if self.met(t, self.slo_ms) else "missed"})
        return rows


def server_capacity(host: str, port: int, requests: Sequence[bytes], *, slo_ms: float, low: float, high: float,
                    seconds: float, min_samples: int = 500, steps: int = 6, resolution: float = 0.05,
                    **kwargs) -> ServerScenario:
    """Server scenario: bisect offered rates between ``low`` and ``high`` (requests/s) for the highest
    whose p99 latency is within ``slo_ms``.

    Each trial runs ``seconds`` or ``min_samples`` requests, whichever is more (a p99 needs samples:
    with 500, five requests lie above it). ``high`` is tried first: if it meets the SLO, it is the answer.
    The bisection stops once the highest rate met and the lowest missed are within ``resolution`` of each
    other, or after ``steps`` steps: :attr:`ServerScenario.bracket` says how close it got (a coarse search
    gives the same few rates in every round, and differences smaller than its step read as ties).
    """
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")
    search = ServerScenario(slo_ms)

    def trial(rate: float) -> bool:
        count = max(min_samples, math.ceil(rate * seconds))
        r = open_loop(host, port, requests, rate=rate, count=count, seed=len(search.trials), **kwargs)
        search.trials.append(r)
        return ServerScenario.met(r, slo_ms)

    if trial(high):
        return search
    if not trial(low):
        return search
    for _ in range(steps):
        if high <= low * (1 + resolution):
            break
        mid = math.sqrt(low * high)  # geometric: rates span an order of magnitude
        if trial(mid):
            low = mid
        else:
            high = mid
    return search


@dataclass
class CpuCost:
    """CPU-ms per answered request by role, the generator included, and its price per million requests."""

    per_request_ms: dict[str, float]
    requests: int

    @property
    def server_ms(self) -> float:
        return sum(v for k, v in self.per_request_ms.items() if k != "generator")

    def price_per_million(self, core_hour_price: float) -> float:
        """What a million requests cost in server CPU at ``core_hour_price`` per core-hour (the generator excluded)."""
        return self.server_ms * 1e6 / 3.6e6 * core_hour_price


def cpu_cost(roles: Callable[[], Mapping[str, Sequence[psutil.Process]]],
             run: Callable[[], LoadgenResult]) -> tuple[CpuCost, LoadgenResult]:
    """Run ``run()`` and account the CPU time each role's processes spent to the requests it answered.

    ``roles`` lists the server's processes by role (``TorchServe.roles``, ``RayServeServer.roles``...);
    it is read before and after the run, so a process that restarts in between is still counted.
    """
    before = {role: cpu_seconds(procs) for role, procs in roles().items()}
    result = run()
    after = {role: cpu_seconds(procs) for role, procs in roles().items()}
    n = max(result.ok, 1)
    per = {role: 1e3 * max(0.0, after.get(role, 0.0) - before.get(role, 0.0)) / n for role in after}
    per["generator"] = 1e3 * result.generator_cpu_s / n
    return CpuCost(per, result.ok), result
