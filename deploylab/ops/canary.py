"""The canary controller (lesson 10): rules on a candidate's live answers, and the decisions they lead to.

The router (:mod:`deploylab.ops.router`) logs every answer; the controller reads that log while the
traffic runs and, step by step, raises the candidate's share or takes it out:

- :class:`Rules` -- the shares to go through and, for each step, how many candidate answers to
  judge and the limits: error rate, top-1 agreement with the served version on the same requests,
  and the candidate's p90 latency against the served version's p90 *on those same requests*;
- :func:`judge` -- one step's verdict: ``rollback`` as soon as the errors or disagreements already
  exceed what ``min_requests`` answers may hold (a broken candidate is cut early, so the number of
  answers it serves is bounded by ``min_requests``), ``wait`` until there are ``min_requests``, then
  ``pass`` or ``rollback`` (latency);
- :class:`Controller` -- runs the steps in a thread beside the load, promotes (the candidate
  becomes the served version; the old one drains) or rolls back (share 0), and keeps every
  decision with the evidence behind it;
- :func:`timeline` -- the log in time bins (share served by the candidate, its error and
  disagreement rates) for the plot.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LessonSizes:
    """Lesson-10 sizes per profile (the code path is the same in every profile)."""

    rate: float  # requests per second offered through the router (Poisson arrivals, open loop)
    bodies: int  # distinct real test images sent, as PNG
    eval_images: int | None  # test images for each version's offline accuracy and agreement (None: all 10,000)
    min_requests: int  # Rules.min_requests: candidate answers judged at each canary step
    shadow_requests: int  # the load of the shadow run
    swap_requests: int  # the load of each swap run (the swap happens a third of the way in)

    def canary_requests(self, steps: Sequence[float]) -> int:
        """Enough load for every step to see ``min_requests`` candidate answers, with half as much again to spare."""
        return int(1.5 * sum(self.min_requests / w for w in steps))


SIZES: dict[str, LessonSizes] = {
    "smoke": LessonSizes(rate=120, bodies=128, eval_images=512, min_requests=40, shadow_requests=240, swap_requests=360),
    "workshop": LessonSizes(rate=150, bodies=1000, eval_images=None, min_requests=100, shadow_requests=1500, swap_requests=1500),
    "full": LessonSizes(rate=150, bodies=2000, eval_images=None, min_requests=200, shadow_requests=3000, swap_requests=3000),
}


def sizes(profile: Any) -> LessonSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


CANDIDATE_ROLES = ("candidate", "shadow")  # answers of the candidate (served in canary, compared only in shadow)
REFERENCE_ROLES = ("reference", "stable")  # answers of the served version


@dataclass(frozen=True)
class Rules:
    """When a candidate moves on, and when it is taken out (see :func:`judge`)."""

    steps: tuple[float, ...] = (0.1, 0.5)  # the candidate's share of the traffic at each step; after the last: promote
    min_requests: int = 100  # candidate answers judged at each step
    max_error_rate: float = 0.01  # answers other than 200 (or none at all)
    min_agreement: float = 0.95  # top-1 agreement with the served version on the same requests
    max_p90_ratio: float = 2.0  # the candidate's p90 over the served version's p90 on the same requests ...
    latency_slack_ms: float = 5.0  # ... plus this: a p90 of a few ms on a shared machine is noisy

    def allowed(self, rate: float) -> int:
        """How many bad answers ``min_requests`` answers may hold at a ``rate`` limit (floor: a fraction is none)."""
        return math.floor(rate * self.min_requests + 1e-9)


@dataclass
class Verdict:
    """One step's decision and its evidence."""

    decision: str  # "wait", "pass" or "rollback"
    answers: int
    errors: int
    agreement: float | None
    candidate_p90_ms: float | None
    reference_p90_ms: float | None
    reasons: list[str] = field(default_factory=list)


def _p90(records: Sequence[dict[str, Any]]) -> float | None:
    lat = [r["latency_ms"] for r in records if r["status"] == 200]
    return float(np.percentile(lat, 90)) if lat else None


def judge(records: Sequence[dict[str, Any]], rules: Rules) -> Verdict:
    """The verdict on one step's log records (the candidate's answers and the served version's on the same requests)."""
    cand = [r for r in records if r["role"] in CANDIDATE_ROLES]
    ref = [r for r in records if r["role"] in REFERENCE_ROLES]
    errors = sum(r["status"] != 200 for r in cand)
    compared = [r["agree"] for r in cand if r["agree"] is not None]
    disagreements = sum(not a for a in compared)
    v = Verdict("wait", len(cand), errors, sum(compared) / len(compared) if compared else None, _p90(cand), _p90(ref))
    if errors > rules.allowed(rules.max_error_rate):
        v.reasons.append(f"{errors} errors in {len(cand)} answers: more than the {rules.allowed(rules.max_error_rate)} "
                         f"that {rules.min_requests} answers may hold at {rules.max_error_rate:.1%}")
    if disagreements > rules.allowed(1 - rules.min_agreement):
        v.reasons.append(f"{disagreements} disagreements with the served version in {len(compared)} answers: more than the "
                         f"{rules.allowed(1 - rules.min_agreement)} allowed in {rules.min_requests} at {rules.min_agreement:.0%} agreement")
    if v.reasons:
        v.decision = "rollback"
        return v
    if len(cand) < rules.min_requests:
        return v
    limit = None if v.reference_p90_ms is None else v.reference_p90_ms * rules.max_p90_ratio + rules.latency_slack_ms
    if v.candidate_p90_ms is not None and limit is not None and v.candidate_p90_ms > limit:
        v.reasons.append(f"p90 {v.candidate_p90_ms:.1f} ms over {limit:.1f} ms ({rules.max_p90_ratio:g} x the served "
                         f"version's {v.reference_p90_ms:.1f} ms + {rules.latency_slack_ms:g} ms)")
        v.decision = "rollback"
    else:
        v.decision = "pass"
    return v


class Controller:
    """Runs a canary through ``rules.steps`` on a :class:`~deploylab.ops.router.RouterServer` (in a thread).

    ``promote`` is called with no argument when the last step passes (the swap: the candidate
    becomes the served version, the old one drains); a rollback sets the share to 0 and removes the
    candidate. Without a decision by ``deadline_s`` the candidate is rolled back too: no evidence,
    no promotion.
    """

    def __init__(self, router: Any, candidate: dict[str, str], rules: Rules, *, promote: Callable[[], Any],
                 poll_s: float = 0.1, deadline_s: float = 120.0):
        self.router, self.candidate, self.rules, self.promote = router, candidate, rules, promote
        self.poll_s, self.deadline_s = poll_s, deadline_s
        self.events: list[dict[str, Any]] = []
        self.outcome: str | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _event(self, t: float, action: str, weight: float, verdict: Verdict | None) -> None:
        self.events.append({"t": t, "action": action, "weight": weight, **(asdict(verdict) if verdict else {})})

    def run(self) -> str:
        """Go through the steps; returns ``promoted`` or ``rolled back``."""
        rules, t_end = self.rules, time.monotonic() + self.deadline_s
        _, cursor = self.router.log(since=10**12)  # only what comes after this point counts
        step, window = 0, []
        last_t = self.router.configure(candidate=self.candidate, weight=rules.steps[0], shadow=False)["t"]
        self._event(last_t, "start", rules.steps[0], None)
        while True:
            time.sleep(self.poll_s)
            records, cursor = self.router.log(since=cursor)
            window += records
            last_t = records[-1]["t"] if records else last_t
            verdict = judge(window, rules)
            if verdict.decision == "rollback" or (verdict.decision == "wait" and time.monotonic() > t_end):
                if verdict.decision == "wait":
                    verdict.reasons.append(f"no decision within {self.deadline_s:g} s: not enough answers")
                self.router.configure(candidate=None, weight=0.0)
                self._event(last_t, "rollback", 0.0, verdict)
                self.outcome = "rolled back"
                return self.outcome
            if verdict.decision == "pass":
                step += 1
                if step == len(rules.steps):
                    self.promote()
                    self.router.configure(candidate=None, weight=0.0)  # it is the served version now
                    self._event(last_t, "promote", 1.0, verdict)
                    self.outcome = "promoted"
                    return self.outcome
                self.router.configure(weight=rules.steps[step])
                self._event(last_t, "step", rules.steps[step], verdict)
                window = []

    def start(self) -> "Controller":
        """Run in a background thread (the load generator keeps the notebook's main thread)."""
        def target() -> None:
            try:
                self.run()
            except BaseException as e:  # kept for join(): a thread's exception would otherwise vanish
                self.error = e

        self._thread = threading.Thread(target=target, name="canary-controller", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float | None = None) -> str:
        """Wait for the decision; re-raises what the controller raised."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the controller decided nothing in {timeout_s} s")
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


def served_by(records: Sequence[dict[str, Any]], version: str) -> int:
    """How many answers ``version`` returned to clients (its compared-only answers do not count)."""
    return sum(r["served"] and r["version"] == version for r in records)


def timeline(records: Sequence[dict[str, Any]], candidate: str, bin_s: float = 0.5) -> list[dict[str, float]]:
    """Per ``bin_s``: answers served, the candidate's share of them, its error and disagreement rates (NaN: none).

    ``t`` counts from the first record; ``t0`` is that record's time on the router's clock (the clock of
    the controller's events)."""
    if not records:
        return []
    t = np.array([r["t"] for r in records])
    start, out = t.min(), []
    for lo in np.arange(start, t.max() + bin_s, bin_s):
        part = [r for r, ti in zip(records, t) if lo <= ti < lo + bin_s]
        served = [r for r in part if r["served"]]
        cand = [r for r in part if r["version"] == candidate and r["role"] in CANDIDATE_ROLES]
        compared = [r["agree"] for r in cand if r["agree"] is not None]
        out.append({"t": float(lo - start), "t0": float(start), "served": len(served),
                    "share": sum(r["version"] == candidate for r in served) / len(served) if served else float("nan"),
                    "error_rate": sum(r["status"] != 200 for r in cand) / len(cand) if cand else float("nan"),
                    "disagreement": 1 - sum(compared) / len(compared) if compared else float("nan")})
    return out
