"""Lesson 10's exercise: how many answers does a broken candidate serve before the controller rolls it back?

The controller (``ops.canary.judge``) rolls back as soon as the disagreements exceed the number
``min_requests`` answers may hold at ``min_agreement``: ``k = floor((1 - min_agreement) * min_requests) + 1``
disagreements end the canary. A candidate that disagrees on a share ``disagreement`` of requests
needs, on average, ``k / disagreement`` answers to make ``k`` disagreements (the mean of a negative
binomial): the learner computes that expectation (``expected_answers``).
"""

from __future__ import annotations

import math
from typing import Any

from . import Exercise, WrongAnswer, as_number

NAME = "answers_before_rollback"


def solution(*, min_requests: int, min_agreement: float, disagreement: float) -> dict[str, Any]:
    """k disagreements end the canary; at a rate ``disagreement`` per answer they take k / disagreement answers on average."""
    k = math.floor((1 - min_agreement) * min_requests + 1e-9) + 1
    return {"expected_answers": k / disagreement}


def check(answers: dict[str, Any], *, min_requests: int, min_agreement: float, disagreement: float) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    got = as_number(answers["expected_answers"])
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        raise WrongAnswer(f"expected_answers is a number of answers, got {got!r}")
    right = solution(min_requests=min_requests, min_agreement=min_agreement, disagreement=disagreement)["expected_answers"]
    if not math.isclose(got, right, rel_tol=0.02):
        allowed = math.floor((1 - min_agreement) * min_requests + 1e-9)
        raise WrongAnswer(f"expected_answers={got:g}: how many disagreements end the canary? {min_requests} answers may hold "
                          f"{allowed} at {min_agreement:.0%} agreement, so the rollback comes with one more; and each answer "
                          f"disagrees with probability {disagreement:.3f}")
    return f"about {right:.1f} answers reach clients before the rollback (bound: {min_requests})"


def example_inputs() -> dict[str, Any]:
    """The rules and the broken candidate's offline agreement recorded by the committed run of lesson 10."""
    from deploylab import results

    for profile in ("workshop", "smoke"):
        for r in results.read_results(profile):
            if r["lesson"] == "rollout" and "offline" in r:
                canary_rec = next(x for x in results.read_results(profile) if x["lesson"] == "rollout" and "rules" in x)
                rules = canary_rec["rules"]
                agreement = r["offline"]["int8, black calibration"]["top1_agreement"]
                return {"min_requests": rules["min_requests"], "min_agreement": rules["min_agreement"], "disagreement": 1 - agreement}
    raise FileNotFoundError("no results/<profile>/rollout.json yet: run notebooks/10_rollout.ipynb")


def wrong_answers(answers: dict[str, Any], **inputs: Any) -> list[dict[str, Any]]:
    """Near misses: one disagreement too few, the bound itself, the count of disagreements, a share instead of a count."""
    k = math.floor((1 - inputs["min_agreement"]) * inputs["min_requests"] + 1e-9) + 1
    d = inputs["disagreement"]
    return [{"expected_answers": (k - 1) / d if k > 1 else 0.5 / d}, {"expected_answers": inputs["min_requests"]},
            {"expected_answers": k}, {"expected_answers": k * d}, {"expected_answers": "many"}]


EXERCISE = Exercise(
    name=NAME,
    lesson="10_rollout",
    answers=("expected_answers",),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
