"""Lesson 01's exercise: which layer costs the most accuracy when it alone runs in INT8, and how much.

The learner reads a per-layer sensitivity scan (``quantize.layer_sensitivity``: layer name -> accuracy
with only that layer quantized) and answers ``most_sensitive`` (a layer name) and ``cost_points``
(percentage points lost against the fp32 accuracy on the same images, positive when accuracy drops).
"""

from __future__ import annotations

import math
from typing import Any

from . import Exercise, WrongAnswer, as_number

# A rounded answer is right: two decimals of a point are what the lesson prints.
TOLERANCE_POINTS = 0.01


def solution(sensitivity: dict[str, float], base_accuracy: float) -> dict[str, Any]:
    """The layer with the lowest accuracy when it alone is INT8, and what it costs in points."""
    most_sensitive = min(sensitivity, key=sensitivity.get)
    cost_points = 100 * (base_accuracy - sensitivity[most_sensitive])
    return {"most_sensitive": most_sensitive, "cost_points": cost_points}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE_POINTS + 1e-9


def check(answers: dict[str, Any], sensitivity: dict[str, float], base_accuracy: float) -> str:
    """The sentence for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    layer, cost = answers["most_sensitive"], answers["cost_points"]
    cost = as_number(cost)
    if not isinstance(layer, str) or layer not in sensitivity:
        raise WrongAnswer(f"most_sensitive must be the name of a scanned layer (a key of sensitivity, "
                          f"e.g. {next(iter(sensitivity))!r}), got {layer!r}")
    lowest = min(sensitivity.values())
    if sensitivity[layer] > lowest:
        raise WrongAnswer(f"{layer} keeps {sensitivity[layer]:.2%}; another layer keeps less -- the most sensitive "
                          f"layer is the one with the LOWEST accuracy when it alone is INT8")
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost):
        raise WrongAnswer(f"cost_points must be a number (percentage points), got {cost!r}")
    expected = 100 * (base_accuracy - sensitivity[layer])
    if _close(cost, expected):
        return f"{layer} costs {expected:.2f} points when it alone is INT8"
    if not _close(expected, 0.0) and _close(cost, -expected):
        raise WrongAnswer("the sign is flipped: a cost is the fp32 accuracy minus the accuracy with the layer in INT8 "
                          "(positive when accuracy drops)")
    if not _close(expected, 0.0) and abs(cost - expected / 100) <= 1e-6:
        raise WrongAnswer("that is a fraction: cost_points is in percentage points (multiply the difference by 100)")
    raise WrongAnswer(f"right layer, but {cost} points is not what it costs: compare its accuracy with base_accuracy "
                      f"({base_accuracy:.2%}), the fp32 accuracy on the same images")


def wrong_answers(answers: dict[str, Any], sensitivity: dict[str, float], base_accuracy: float) -> list[dict[str, Any]]:
    """Near misses ``check`` must refuse: the runner-up layer, a wrong cost, the cost with its sign flipped."""
    layer, cost = answers["most_sensitive"], answers["cost_points"]
    wrong: list[dict[str, Any]] = []
    lowest = min(sensitivity.values())
    runners_up = sorted((a, n) for n, a in sensitivity.items() if a > lowest)
    if runners_up:
        second = runners_up[0][1]
        wrong.append({"most_sensitive": second, "cost_points": 100 * (base_accuracy - sensitivity[second])})
    wrong.append({"most_sensitive": layer, "cost_points": cost + 0.5})
    if abs(2 * cost) > TOLERANCE_POINTS:  # a flipped sign (or a fraction) of a cost near 0 would still be right
        wrong.append({"most_sensitive": layer, "cost_points": -cost})
    if abs(cost - cost / 100) > TOLERANCE_POINTS:
        wrong.append({"most_sensitive": layer, "cost_points": cost / 100})
    return wrong


def example_inputs() -> dict[str, Any]:
    """A real scan, small: the shipped student, 256 validation images (a scan chooses), four layers, per-tensor weights.

    With per-tensor weights the student's first depthwise convolution (``features.1.conv.0.0``) loses
    several points on its own while the others lose about nothing: a clear answer, and near misses.
    """
    from .. import assets, config, data, quantize
    from ..train import accuracy, predict

    student = assets.student(config.get_profile("workshop"))  # the shipped model, whatever the profile
    x, y = data.tensors("val", 256)
    layers = ["features.1.conv.0.0", "features.2.conv.0.0", "features.5.conv.0.0", "features.13.conv.1.0"]
    sensitivity = quantize.layer_sensitivity(student.model, x, y, data.calibration_set(64), layers, per_channel=False)
    return {"sensitivity": sensitivity, "base_accuracy": accuracy(predict(student.model, x), y)}


EXERCISE = Exercise(
    name="most_sensitive_layer",
    lesson="01_quantization",
    answers=("most_sensitive", "cost_points"),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
