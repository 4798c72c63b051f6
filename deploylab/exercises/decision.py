"""Lesson 07's exercise: which variants fit a latency budget at a given accuracy?

From the decision table (``decision.load``, the rows of one machine), the learner lists the variants whose p50 latency at
batch 1 is at most :data:`BUDGET_MS` and whose accuracy is at least that of the ``student ONNX
fp32`` row minus one point, fastest first (``cheap_and_good``, a list of variant names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import Exercise, WrongAnswer

NAME = "cheap_and_good"
BUDGET_MS = 1.0
ANCHOR = "student ONNX fp32"  # the row whose accuracy, minus one point, is the floor


def accuracy_floor(rows: Sequence[Any], fallback_accuracy: float) -> float:
    """The ONNX student's accuracy minus one point (``fallback_accuracy`` minus one point if that row is missing)."""
    anchor = next((r for r in rows if r.variant == ANCHOR), None)
    return (anchor.accuracy if anchor is not None else fallback_accuracy) - 0.01


def solution(*, rows: Sequence[Any], fallback_accuracy: float) -> dict[str, Any]:
    """``decision.qualifying`` with the budget and the floor; it returns the rows fastest first."""
    from deploylab import decision

    floor = accuracy_floor(rows, fallback_accuracy)
    return {"cheap_and_good": [r.variant for r in decision.qualifying(rows, latency_budget_ms=1.0, min_accuracy=floor,
                                                                      batch_size=1)]}


def check(answers: dict[str, Any], *, rows: Sequence[Any], fallback_accuracy: float) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    got = answers["cheap_and_good"]
    if not isinstance(got, list) or not all(isinstance(v, str) for v in got):
        raise WrongAnswer(f"cheap_and_good is a list of variant names (r.variant), got {got!r}")
    by_name = {r.variant: r for r in rows}
    unknown = [v for v in got if v not in by_name]
    if unknown:
        raise WrongAnswer(f"not rows of the decision table: {unknown}")
    floor = accuracy_floor(rows, fallback_accuracy)
    slow = [v for v in got if by_name[v].latency(1) is None or by_name[v].latency(1) > BUDGET_MS]
    if slow:
        raise WrongAnswer(f"above the {BUDGET_MS:g} ms budget at batch 1 (or not measured there): {slow}")
    weak = [v for v in got if by_name[v].accuracy is None or by_name[v].accuracy < floor]
    if weak:
        raise WrongAnswer(f"below the accuracy floor ({floor:.2%}): {weak}")
    expected = {r.variant for r in rows if r.accuracy is not None and r.accuracy >= floor
                and r.latency(1) is not None and r.latency(1) <= BUDGET_MS}
    if set(got) != expected:
        raise WrongAnswer(f"{len(expected - set(got))} qualifying variant(s) missing")
    if [by_name[v].latency(1) for v in got] != sorted(by_name[v].latency(1) for v in got):
        raise WrongAnswer("the right variants, but not fastest first")
    return f"{len(got)} variant(s) fit {BUDGET_MS:g} ms at batch 1 within 1 point of the ONNX student (floor {floor:.2%})"


def example_inputs() -> dict[str, Any]:
    """The decision table of the committed workshop results: the rows measured on the ONNX student's machine
    (a latency budget ranks rows of one machine only)."""
    from deploylab import decision

    rows, _ = decision.load("workshop")
    anchor = next(r for r in rows if r.variant == ANCHOR)
    return {"rows": decision.on_machine(rows, anchor.machine), "fallback_accuracy": anchor.accuracy}


def wrong_answers(answers: dict[str, Any], *, rows: Sequence[Any], fallback_accuracy: float) -> list[dict[str, Any]]:
    """Near misses: the order reversed, one variant left out, the next-fastest over the budget added, names as a set."""
    from deploylab import decision

    right = answers["cheap_and_good"]
    over = [r.variant for r in decision.qualifying(rows, latency_budget_ms=1e9, min_accuracy=0.0)
            if r.variant not in right]
    wrong = [{"cheap_and_good": right[:-1]}, {"cheap_and_good": set(right)}]
    if len(right) > 1:
        wrong.append({"cheap_and_good": right[::-1]})
    if over:
        wrong.append({"cheap_and_good": right + over[:1]})
    return [w for w in wrong if w["cheap_and_good"] != right]


EXERCISE = Exercise(
    name=NAME,
    lesson="07_end_to_end",
    answers=("cheap_and_good",),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
