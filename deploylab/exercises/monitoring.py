"""Lesson 09's exercise: the burn rate behind the latency alert, from the counts Prometheus held when it fired.

From the requests counted in the alert's short window when it fired (``requests``) and those
answered within the SLO's 50 ms (``fast``, the histogram's ``le="0.05"`` bucket), and the SLO's
target share (``target``, 0.99), the learner computes the **burn rate** (``burn_rate``: the share of
slow requests over the share the SLO allows) and how many **hours** a 30-day error budget lasts at
that rate (``hours_to_exhaust``).
"""

from __future__ import annotations

from typing import Any

from . import Exercise, WrongAnswer, as_number

NAME = "budget_burn"
BUDGET_DAYS = 30


def solution(*, requests: float, fast: float, target: float) -> dict[str, Any]:
    """Slow share over allowed share; a budget of 30 days lasts 30 x 24 h divided by the burn rate."""
    burn_rate = (1 - fast / requests) / (1 - target)
    return {"burn_rate": burn_rate, "hours_to_exhaust": BUDGET_DAYS * 24 / burn_rate}


def _close(name: str, value: Any, right: float, hint: str) -> None:
    value = as_number(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WrongAnswer(f"{name} is a number, got {value!r}")
    if abs(value - right) > 0.01 * abs(right):
        raise WrongAnswer(f"{name}={value:.4g} is off: {hint}")


def check(answers: dict[str, Any], *, requests: float, fast: float, target: float) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    right = solution(requests=requests, fast=fast, target=target)
    _close("burn_rate", answers["burn_rate"], right["burn_rate"],
           "the share of requests slower than 50 ms, divided by the share the SLO allows (1 - target)")
    _close("hours_to_exhaust", answers["hours_to_exhaust"], right["hours_to_exhaust"],
           f"a burn rate of 1 spends the budget in exactly {BUDGET_DAYS} days; hours = {BUDGET_DAYS} x 24 / burn rate")
    return (f"{1 - fast / requests:.1%} slow against {1 - target:.0%} allowed: a burn rate of {right['burn_rate']:.1f}, "
            f"the 30-day budget gone in {right['hours_to_exhaust']:.1f} hours")


def example_inputs() -> dict[str, Any]:
    """The counts recorded by the committed workshop run of lesson 09 when its latency alert fired."""
    from deploylab import results

    alert = next(r["alert"] for r in results.read_results("workshop") if r["lesson"] == "monitoring")
    counts = alert["at_firing"]
    return {"requests": counts["requests"], "fast": counts["fast"], "target": alert["latency_target"]}


def wrong_answers(answers: dict[str, Any], **inputs: Any) -> list[dict[str, Any]]:
    """Near misses: the good share instead of the slow one, no division by the allowance, days instead of hours."""
    b, h = answers["burn_rate"], answers["hours_to_exhaust"]
    good = inputs["fast"] / inputs["requests"] / (1 - inputs["target"])
    slow = 1 - inputs["fast"] / inputs["requests"]
    candidates = [{"burn_rate": good, "hours_to_exhaust": h}, {"burn_rate": slow, "hours_to_exhaust": h},
            {"burn_rate": b, "hours_to_exhaust": h / 24}, {"burn_rate": b, "hours_to_exhaust": BUDGET_DAYS / b},
            {"burn_rate": b * 1.05, "hours_to_exhaust": h}, {"burn_rate": b, "hours_to_exhaust": h * 0.95},
            {"burn_rate": b, "hours_to_exhaust": "soon"}]
    # a near miss must miss: with half the requests fast, the good share equals the slow one
    return [c for c in candidates if any(isinstance(c[k], str) or abs(c[k] - answers[k]) > 0.02 * abs(answers[k]) for k in c)]


EXERCISE = Exercise(
    name=NAME,
    lesson="09_monitoring",
    answers=("burn_rate", "hours_to_exhaust"),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
