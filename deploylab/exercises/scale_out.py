"""Lesson 08's exercise: how many 1-core replicas and proxies for a target rate?

From the per-core rates measured in the lesson (``replica_rate``, ``proxy_rate``: images per
second per core), the learner finds the fewest 1-core replicas (``replicas_needed``) and 1-core
proxies (``proxies_needed``) that reach ``target_rate`` images per second.
"""

from __future__ import annotations

import math
from typing import Any

from . import Exercise, WrongAnswer, as_number

NAME = "replicas_for_target"


def solution(*, target_rate: float, replica_rate: float, proxy_rate: float) -> dict[str, Any]:
    """Round up: a fraction of a replica does not exist, and one too few misses the target."""
    return {"replicas_needed": math.ceil(target_rate / replica_rate), "proxies_needed": math.ceil(target_rate / proxy_rate)}


def _fewest(name: str, n: Any, rate: float, target_rate: float) -> None:
    n = as_number(n)
    if isinstance(n, bool) or not isinstance(n, int):
        raise WrongAnswer(f"{name} is a whole number of 1-core processes (an int), got {n!r}")
    if n * rate < target_rate:
        raise WrongAnswer(f"{name}={n}: {n} x {rate:.0f} images/s = {n * rate:.0f} images/s does not reach {target_rate:g}")
    if (n - 1) * rate >= target_rate:
        raise WrongAnswer(f"{name}={n}: one fewer would still reach {target_rate:g} images/s")


def check(answers: dict[str, Any], *, target_rate: float, replica_rate: float, proxy_rate: float) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    _fewest("replicas_needed", answers["replicas_needed"], replica_rate, target_rate)
    _fewest("proxies_needed", answers["proxies_needed"], proxy_rate, target_rate)
    return f"{answers['replicas_needed']} replicas and {answers['proxies_needed']} proxies for {target_rate:g} images/s"


def example_inputs() -> dict[str, Any]:
    """The per-core rates recorded by the committed workshop run of lesson 08, and the lesson's target."""
    from deploylab import results

    ray = next(r["ray"] for r in results.read_results("workshop") if r["lesson"] == "scale_out" and "ray" in r)
    return {"target_rate": 1000, "replica_rate": ray["rate_per_core"]["replicas"], "proxy_rate": ray["rate_per_core"]["proxy"]}


def wrong_answers(answers: dict[str, Any], **inputs: Any) -> list[dict[str, Any]]:
    """Near misses: rounded down, one too many, a float, the proxies' count swapped in."""
    r, p = answers["replicas_needed"], answers["proxies_needed"]
    exact = inputs["target_rate"] / inputs["replica_rate"]
    return [{"replicas_needed": r - 1, "proxies_needed": p}, {"replicas_needed": r + 1, "proxies_needed": p},
            {"replicas_needed": r, "proxies_needed": p + 1}, {"replicas_needed": exact, "proxies_needed": p},
            {"replicas_needed": r, "proxies_needed": p - 1}]


EXERCISE = Exercise(
    name=NAME,
    lesson="08_scale_out",
    answers=("replicas_needed", "proxies_needed"),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
