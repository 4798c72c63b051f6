"""Lesson 02's exercise: prune the student to a MAC budget with torch-pruning, choosing on validation images.

The learner removes channels from the dense student with torch-pruning's ``BasePruner`` (L1 or L2
magnitude importance, one ``pruner.step()``, the classifier ignored, channel counts rounded to
``round_to``) at each candidate ratio of :data:`RATIOS`, re-estimates the BatchNorm statistics on
training images (:func:`deploylab.prune_scan.recalibrate_batchnorm`: the cheap recovery, no
fine-tune), counts the MACs (:func:`deploylab.bench.count_macs`) and keeps the candidates at or below
:data:`MAC_BUDGET` of the dense student's MACs. Among those, the one most accurate on the
*validation* images is the answer: ``importance_p`` (1 or 2), ``pruning_ratio`` and ``val_accuracy`` (a
fraction in [0, 1]).

The check prunes the same candidates itself, so it refuses an answer over the budget, one that is not
the most accurate in budget, a ``val_accuracy`` scored on test images or written as a percentage.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from . import Exercise, WrongAnswer, as_number

NAME = "prune_to_mac_budget"
MAC_BUDGET = 0.6  # at most this fraction of the dense student's MACs
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)  # candidate fractions of channels removed
IMPORTANCES = (1, 2)  # the norm of MagnitudeImportance(p=...)
CALIBRATION_IMAGES = 2000  # training images for the BatchNorm statistics

_cache: dict[str, Any] = {}  # the last reference computation (the check runs once per answer)


def pruned_candidate(model: nn.Module, p: int, ratio: float, example: torch.Tensor, x_calib: torch.Tensor,
                     round_to: int) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of its channels removed (L``p`` magnitude), BatchNorm re-estimated on ``x_calib``."""
    import torch_pruning as tp

    from ..prune import classifier
    from ..prune_scan import recalibrate_batchnorm

    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.BasePruner(m, example, importance=tp.importance.MagnitudeImportance(p=p), pruning_ratio=ratio,
                                  ignored_layers=[classifier(m)], round_to=round_to)
    pruner.step()
    return recalibrate_batchnorm(m, x_calib)


def _reference(model, example, x_calib, x_val, y_val, round_to) -> dict[tuple[int, float], dict[str, Any]]:
    """(p, ratio) -> MAC fraction, validation accuracy and the model, computed once per set of inputs."""
    from ..bench import count_macs
    from ..train import evaluate

    key = (model, example, x_calib, x_val, y_val)  # the same objects (a tensor's == is element-wise), and round_to
    cached = _cache.get("key")
    if cached is not None and all(a is b for a, b in zip(cached, key, strict=True)) and _cache["round_to"] == round_to:
        return _cache["value"]
    dense = count_macs(model, example)
    out = {}
    for p in IMPORTANCES:
        for r in RATIOS:
            m = pruned_candidate(model, p, r, example, x_calib, round_to)
            out[p, r] = {"macs": count_macs(m, example) / dense, "val_accuracy": evaluate(m, x_val, y_val), "model": m}
    _cache.update(key=key, round_to=round_to, value=out)
    return out


def _tolerance(y_val: torch.Tensor) -> float:
    return 2.5 / len(y_val)  # two images: threads may round a logit differently


def solution(*, model: nn.Module, example: torch.Tensor, x_calib: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
             x_test: torch.Tensor, y_test: torch.Tensor, round_to: int) -> dict[str, Any]:
    """Every candidate pruned, recalibrated, counted and scored on validation images; the best in budget."""
    import torch_pruning as tp

    from deploylab import bench, prune, prune_scan
    from deploylab.train import evaluate

    dense_macs = bench.count_macs(model, example)
    in_budget = []
    for p in (1, 2):
        for ratio in (0.1, 0.2, 0.3, 0.4, 0.5):
            m = copy.deepcopy(model).eval()
            pruner = tp.pruner.BasePruner(m, example, importance=tp.importance.MagnitudeImportance(p=p),
                                          pruning_ratio=ratio, ignored_layers=[prune.classifier(m)], round_to=round_to)
            pruner.step()
            prune_scan.recalibrate_batchnorm(m, x_calib)  # training images
            if bench.count_macs(m, example) <= 0.6 * dense_macs:
                in_budget.append((evaluate(m, x_val, y_val), p, ratio))  # validation images, never x_test
    val_accuracy, p, ratio = max(in_budget, key=lambda t: t[0])
    return {"importance_p": p, "pruning_ratio": ratio, "val_accuracy": val_accuracy}


def check(answers: dict[str, Any], *, model: nn.Module, example: torch.Tensor, x_calib: torch.Tensor, x_val: torch.Tensor,
          y_val: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, round_to: int) -> str:
    """Right when the candidate is in budget, the most accurate on validation images, and its validation accuracy is given."""
    from ..data import TestImagesError, refuse_test_images
    from ..train import evaluate

    try:
        refuse_test_images(x_val, "the choice of the pruned candidate")
    except TestImagesError as e:
        raise WrongAnswer(str(e)) from None
    p, ratio, acc = as_number(answers["importance_p"]), as_number(answers["pruning_ratio"]), as_number(answers["val_accuracy"])
    if p not in IMPORTANCES or isinstance(p, bool):
        raise WrongAnswer(f"importance_p is the norm of MagnitudeImportance(p=...): one of {IMPORTANCES}, got {p!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not any(abs(ratio - r) < 1e-9 for r in RATIOS):
        raise WrongAnswer(f"pruning_ratio is one of the candidates {RATIOS}, got {ratio!r}")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
        raise WrongAnswer(f"val_accuracy must be a number (a fraction in [0, 1]), got {acc!r}")
    if not 0 <= acc <= 1:
        raise WrongAnswer(f"val_accuracy is a fraction in [0, 1], not a percentage: got {acc}")
    ref = _reference(model, example, x_calib, x_val, y_val, round_to)
    ratio = min(RATIOS, key=lambda r: abs(r - ratio))
    mine = ref[p, ratio]
    if mine["macs"] > MAC_BUDGET + 1e-12:
        raise WrongAnswer(f"L{p} at ratio {ratio} keeps {mine['macs']:.1%} of the dense MACs, over the budget of "
                          f"{MAC_BUDGET:.0%}: count them with bench.count_macs after pruner.step() (round_to={round_to} "
                          "keeps more channels than the ratio says)")
    in_budget = {k: v for k, v in ref.items() if v["macs"] <= MAC_BUDGET + 1e-12}
    best = max(v["val_accuracy"] for v in in_budget.values())
    tol = _tolerance(y_val)
    if mine["val_accuracy"] < best - tol:
        raise WrongAnswer(f"L{p} at ratio {ratio} is in budget but scores {mine['val_accuracy']:.2%} on the validation images; "
                          "another candidate in budget scores higher there (prune as little as the budget allows, and "
                          "compare both importances: the choice is made on x_val, after recalibrating BatchNorm)")
    if abs(acc - mine["val_accuracy"]) > tol:
        hint = ""
        if abs(acc - evaluate(mine["model"], x_test, y_test)) <= tol:
            hint = " -- that is its accuracy on the test images: a choice is scored on validation images"
        elif abs(acc - evaluate(model, x_val, y_val)) <= tol:
            hint = " -- that is the dense student's accuracy"
        raise WrongAnswer(f"right candidate, but val_accuracy={acc:.4f} is not its accuracy on x_val, y_val after "
                          f"recalibrate_batchnorm (it scores {mine['val_accuracy']:.2%} there){hint}")
    over = [k for k, v in ref.items() if v["macs"] > MAC_BUDGET + 1e-12]
    lost = evaluate(model, x_val, y_val) - mine["val_accuracy"]
    return (f"L{p} at ratio {ratio}: {mine['macs']:.1%} of the dense MACs, {mine['val_accuracy']:.2%} on {len(y_val):,} "
            f"validation images ({100 * lost:.1f} points below dense before any fine-tune; {len(over)} of {len(ref)} "
            "candidates were over budget). Score it on the test set once, after its fine-tune.")


def example_inputs() -> dict[str, Any]:
    """The shipped student, 2,000 training images for BatchNorm, 1,000 validation and 1,000 test images."""
    from deploylab import assets, data

    x_val, y_val = data.tensors("val", 1000)
    x_test, y_test = data.tensors("test", 1000)
    return {"model": assets.student("workshop", build=False).model.eval(), "example": x_val[:1],
            "x_calib": data.tensors("train", CALIBRATION_IMAGES)[0], "x_val": x_val, "y_val": y_val,
            "x_test": x_test, "y_test": y_test, "round_to": 8}


def wrong_answers(answers: dict[str, Any], **inputs: Any) -> list[dict[str, Any]]:
    """Near misses: the best candidate over budget, a worse one in budget, the test accuracy, a percentage."""
    from ..train import evaluate

    ref = _reference(inputs["model"], inputs["example"], inputs["x_calib"], inputs["x_val"], inputs["y_val"], inputs["round_to"])
    tol = _tolerance(inputs["y_val"])
    right = (answers["importance_p"], answers["pruning_ratio"])
    wrong = []
    over = [k for k, v in ref.items() if v["macs"] > MAC_BUDGET + 1e-12]
    if over:  # the most accurate candidate of all, which the budget rules out
        k = max(over, key=lambda k: ref[k]["val_accuracy"])
        wrong.append({"importance_p": k[0], "pruning_ratio": k[1], "val_accuracy": ref[k]["val_accuracy"]})
    worse = [k for k, v in ref.items() if k not in over and v["val_accuracy"] < ref[right]["val_accuracy"] - tol]
    if worse:  # pruned more than needed, or the other importance
        k = max(worse, key=lambda k: ref[k]["val_accuracy"])
        wrong.append({"importance_p": k[0], "pruning_ratio": k[1], "val_accuracy": ref[k]["val_accuracy"]})
    on_test = evaluate(ref[right]["model"], inputs["x_test"], inputs["y_test"])
    if abs(on_test - answers["val_accuracy"]) > 2 * tol:
        wrong.append({**answers, "val_accuracy": on_test})
    wrong.append({**answers, "val_accuracy": 100 * answers["val_accuracy"]})
    return wrong


EXERCISE = Exercise(
    name=NAME,
    lesson="02_pruning",
    answers=("importance_p", "pruning_ratio", "val_accuracy"),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
