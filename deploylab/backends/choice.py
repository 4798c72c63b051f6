"""Scoring the runtimes and choosing one by measurement (lesson 04b).

- :func:`score` (from :mod:`deploylab.stats`, shared with lessons 01-02) -- accuracy on the test images with a
  95% interval (Wilson), and the paired comparison with the fp32 student on the *same* images: top-1 agreement
  and the accuracy difference with a paired-bootstrap interval (each resample draws images, not two independent sets);
- :func:`conv_flops` -- where the student's FLOPs are (depthwise, pointwise, dense convolutions, linear);
- :func:`choose` -- the fastest variant whose paired interval stays within a tolerance of the fp32
  student, checked against ONNX Runtime fp32 and the matmul floor: a target counts as met only when
  every round clears it (the slowest round's ratio), never on the median alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..stats import Score, score, wilson, within_tolerance
from ..tables import target_line
from .harness import Timing, floor_ms

__all__ = ["Choice", "Score", "choose", "conv_flops", "gemm_depth", "score", "wilson"]  # Score, score, wilson: re-exported


def conv_flops(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of one forward pass by kind: depthwise, pointwise (1x1), dense conv, linear.

    Depthwise convolutions do 9 multiply-adds per value they load (a 3x3 window of one channel):
    memory-bound, far below a GEMM's rate on any runtime. Their share bounds how close a CNN like
    MobileNetV2 can come to the matmul floor.
    """
    return {k: sum(f for _, f in v) // len(example) for k, v in _layer_flops(model, example).items()}


def gemm_depth(model: nn.Module, example: torch.Tensor) -> int:
    """FLOP-weighted median inner dimension (input channels) of the 1x1 convolutions: how deep their GEMMs are.

    A 1x1 convolution is a matrix product whose inner dimension is its input channels; a GEMM only
    approaches the machine's rate when that dimension is large (the floor's matmul is 1024 deep).
    """
    layers = sorted(_layer_flops(model, example)["pointwise conv"])
    half, seen = sum(f for _, f in layers) / 2, 0
    for depth, f in layers:
        seen += f
        if seen >= half:
            return depth
    raise ValueError("the model has no 1x1 convolution")


def _layer_flops(model: nn.Module, example: torch.Tensor) -> dict[str, list[tuple[int, int]]]:
    """Per layer kind, ``(inner dimension, FLOPs)`` of each convolution / linear layer on ``example``."""
    totals: dict[str, list[tuple[int, int]]] = {"depthwise conv": [], "pointwise conv": [], "dense conv": [], "linear": []}

    def hook(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            kind = ("depthwise conv" if mod.groups > 1 and mod.groups == mod.in_channels else
                    "pointwise conv" if k == mod.in_channels else "dense conv")
            totals[kind].append((k, 2 * out.numel() * k))
        else:
            totals["linear"].append((mod.in_features, 2 * out.numel() * mod.in_features))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return totals


@dataclass
class Choice:
    """The measured choice: the chosen variant, why, and each target with its verdict."""

    chosen: str
    baseline: str
    eligible: list[str]
    speedup: dict[int, float]  # median-round ratio baseline / chosen, per batch size
    speedup_worst: dict[int, float]  # the slowest round's ratio
    best_fp32: str
    floor_share: float  # the best fp32 variant's floor / p50 at batch 32
    floor_share_worst: float
    targets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return all(t["met"] for t in self.targets)

    def lines(self) -> list[str]:
        """One ``target_line`` per target (met, or MISSED with its measured reason)."""
        return [target_line(t["name"], t["target"], t["measured"], t["met"], t["reason"]) for t in self.targets]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met, "speedup": {str(b): v for b, v in self.speedup.items()},
                "speedup_worst": {str(b): v for b, v in self.speedup_worst.items()}}


def _ratio(base: Timing, other: Timing) -> tuple[float, float]:
    """Median ratio ``base / other`` and its smallest value over the rounds (paired by round)."""
    per_round = [b / o for b, o in zip(base.round_medians, other.round_medians)]
    return base.stats.p50_ms / other.stats.p50_ms, min(per_round)


def choose(scores: Mapping[str, Score], timings: Mapping[str, Mapping[int, Timing]], precisions: Mapping[str, str], *,
           baseline: str, flops_per_image: float, gflops: float, tolerance_points: float = 1.0,
           speedup_targets: Mapping[int, float] = {32: 2.0, 1: 1.5}, floor_target: float = 0.6,
           floor_reason: str = "") -> Choice:
    """The fastest variant at batch 32 whose paired interval stays within ``tolerance_points`` of the fp32 student.

    A variant is eligible when the *lower end* of its paired-bootstrap interval of the accuracy
    difference is above ``-tolerance_points``. Its speed-up over ``baseline`` (median of rounds and
    slowest round) is checked against ``speedup_targets``; the best fp32 variant at batch 32 against
    ``floor_target`` of the matmul rate. Each target is met only if its worst round clears it.
    """
    eligible = [n for n, s in scores.items() if within_tolerance(s, tolerance_points) and n in timings]
    if baseline not in eligible:
        raise ValueError(f"the baseline {baseline!r} must itself be eligible (scored and timed)")
    chosen = min(eligible, key=lambda n: timings[n][32].stats.p50_ms)
    ratios = {b: _ratio(timings[baseline][b], timings[chosen][b]) for b in speedup_targets}
    fp32 = [n for n in timings if precisions[n] == "fp32"]
    best_fp32 = min(fp32, key=lambda n: timings[n][32].stats.p50_ms)
    floor32 = floor_ms(flops_per_image, 32, gflops)
    share, share_worst = floor32 / timings[best_fp32][32].stats.p50_ms, floor32 / timings[best_fp32][32].spread[1]
    choice = Choice(chosen, baseline, eligible, {b: r[0] for b, r in ratios.items()},
                    {b: r[1] for b, r in ratios.items()}, best_fp32, share, share_worst)
    for b, target in speedup_targets.items():
        med, worst = ratios[b]
        reason = (f"{chosen} is the fastest variant within {tolerance_points:g} point; " +
                  ("its median ratio clears the target but its slowest round does not" if med >= target else
                   f"it is {med:.2f}x ONNX Runtime fp32 at batch {b} on this machine"))
        choice.targets.append({"name": f"{chosen} vs {baseline}, batch {b} p50", "target": f">= {target:g}x",
                               "measured": f"{med:.2f}x (slowest round {worst:.2f}x)", "met": worst >= target,
                               "reason": reason})
    choice.targets.append({"name": f"best fp32 ({best_fp32}) at batch 32, share of the matmul rate", "target":
                           f">= {floor_target:.0%}", "measured": f"{share:.0%} (slowest round {share_worst:.0%})",
                           "met": share_worst >= floor_target, "reason": floor_reason})
    return choice
