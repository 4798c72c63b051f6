"""Lesson 01's exercise: quantize the student to meet an accuracy budget, chosen on VALIDATION images.

With per-tensor weights (what many older tools do) the all-INT8 student loses several points. The learner
picks which layers to keep in float (``float_layers``, a list of layer names) so that the PT2E model, with
per-tensor weights and those layers in float, loses at most ``budget_points`` against fp32 on the validation
images -- with as few float layers as the per-layer scan needs (every float layer is a layer that does not run
in INT8). The check builds that model with the learner's layers (the lesson's PT2E calls, reference arithmetic)
and measures it on the validation images it is given; test images are refused, since this is a choice.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from . import Exercise, WrongAnswer

# (model, images, calibration, layers kept in float, reduce_range) -> accuracy: each build costs seconds. The objects
# are kept in the value, so that an id reused by a new object is never taken for the old one.
_CACHE: dict[tuple, tuple[Any, Any, Any, float]] = {}


def _mixed_accuracy(model: torch.nn.Module, calibration: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                    float_layers: tuple[str, ...], reduce_range: bool) -> float:
    """Validation accuracy of ``model`` in INT8 (PT2E, X86InductorQuantizer, per-tensor weights), ``float_layers`` in float."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from .. import quantize
    from ..train import accuracy

    key = (id(model), id(x_val), id(calibration), tuple(sorted(float_layers)), reduce_range)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not model or hit[1] is not x_val or hit[2] is not calibration:
        exported = torch.export.export(copy.deepcopy(model).eval(), (calibration[:32],),
                                       dynamic_shapes=quantize.batch_dim()).module()
        quantizer = X86InductorQuantizer()
        quantizer.set_global(quantize.per_tensor_weights(get_default_x86_inductor_quantization_config(reduce_range=reduce_range)))
        for name in float_layers:
            quantizer.set_module_name_qconfig(name, None)
        prepared = prepare_pt2e(exported, quantizer)
        quantize.calibrate(prepared, quantize.batches_of(calibration, 32))
        _CACHE[key] = (model, x_val, calibration, accuracy(quantize.predict_fixed(convert_pt2e(prepared), x_val), y_val))
    return _CACHE[key][3]


def _fp32_accuracy(model: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    from ..train import accuracy, predict

    return accuracy(predict(model, x_val), y_val)


def solution(*, model, calibration, x_val, y_val, sensitivity, budget_points, reduce_range=False) -> dict[str, Any]:
    """Add layers to float in the order of the per-tensor scan (most sensitive first) until the budget is met."""
    from deploylab.data import refuse_test_images

    refuse_test_images(x_val, "the accuracy budget is a choice: measure it on validation images")
    fp32 = _fp32_accuracy(model, x_val, y_val)
    ranked = sorted(sensitivity, key=sensitivity.get)  # lowest accuracy with only that layer in INT8 first
    float_layers: list[str] = []
    while 100 * (fp32 - _mixed_accuracy(model, calibration, x_val, y_val, tuple(float_layers), reduce_range)) > budget_points:
        if len(float_layers) == len(ranked):
            break
        float_layers.append(ranked[len(float_layers)])
    return {"float_layers": float_layers}


def check(answers: dict[str, Any], *, model, calibration, x_val, y_val, sensitivity, budget_points,
          reduce_range=False) -> str:
    """Right when the model with ``float_layers`` in float meets the budget on validation images, with no more
    float layers than the scan's order needs."""
    from deploylab import quantize
    from deploylab.data import refuse_test_images

    refuse_test_images(x_val, "the accuracy budget is a choice: measure it on validation images")
    layers = answers["float_layers"]
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)):
        raise WrongAnswer(f"float_layers must be a list of layer names, e.g. [{next(iter(sensitivity))!r}], got {layers!r}")
    known = set(quantize.quantizable_layers(model))
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise WrongAnswer(f"not quantizable layers of the student: {unknown[:3]} (the names are the keys of the "
                          f"sensitivity scan, e.g. {next(iter(sensitivity))!r})")
    fp32 = _fp32_accuracy(model, x_val, y_val)
    acc = _mixed_accuracy(model, calibration, x_val, y_val, tuple(layers), reduce_range)
    lost = 100 * (fp32 - acc)
    if lost > budget_points:
        raise WrongAnswer(f"with {len(layers)} layer(s) in float the INT8 student loses {lost:.2f} points on the "
                          f"{len(y_val):,} validation images, over the budget of {budget_points:.2f}: keep the layers "
                          "that the per-tensor scan says lose most")
    needed = solution(model=model, calibration=calibration, x_val=x_val, y_val=y_val, sensitivity=sensitivity,
                      budget_points=budget_points, reduce_range=reduce_range)["float_layers"]
    if len(set(layers)) > len(needed):
        raise WrongAnswer(f"within budget ({lost:.2f} points), but {len(set(layers))} float layers where "
                          f"{len(needed)} suffice: each float layer is one that does not run in INT8 -- add them one "
                          "at a time, most sensitive first, and stop when the budget is met")
    return (f"{len(set(layers))} layer(s) in float: {acc:.2%} on {len(y_val):,} validation images, "
            f"{lost:.2f} points below fp32 (budget {budget_points:.2f})")


def wrong_answers(answers: dict[str, Any], **inputs: Any) -> list[dict[str, Any]]:
    """Near misses: one layer short of the answer, the least sensitive layer instead, one layer too many."""
    right = list(answers["float_layers"])
    ranked = sorted(inputs["sensitivity"], key=inputs["sensitivity"].get)
    spare = [n for n in ranked if n not in right]
    wrong: list[dict[str, Any]] = []
    if right:
        wrong.append({"float_layers": right[:-1]})  # stopped one layer early: over the budget
        wrong.append({"float_layers": right[:-1] + [ranked[-1]]})  # the least sensitive layer instead of the last one
    if spare:
        wrong.append({"float_layers": right + [spare[0]]})  # within budget, one float layer more than needed
    wrong.append({"float_layers": "features.1.conv.0.0"})  # a name, not a list
    return wrong


def example_inputs() -> dict[str, Any]:
    """A real case, small: the shipped student, 512 validation images, the per-tensor scan of its first layers."""
    from .. import assets, config, data, quantize

    student = assets.student(config.get_profile("workshop"))  # the shipped model, whatever the profile
    x, y = data.tensors("val", 512)
    calibration = data.calibration_set(64)
    layers = quantize.quantizable_layers(student.model)[:8]
    sensitivity = quantize.layer_sensitivity(student.model, x, y, calibration, layers, per_channel=False)
    return {"model": student.model, "calibration": calibration, "x_val": x, "y_val": y, "sensitivity": sensitivity,
            "budget_points": 1.0, "reduce_range": False}


EXERCISE = Exercise(
    name="accuracy_budget",
    lesson="01_quantization",
    answers=("float_layers",),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
