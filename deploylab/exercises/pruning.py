"""Lesson 02's exercise: which layer keeps the most of its weights under naive global pruning?

Global magnitude pruning ranks the weights of all layers together, so layers end up with very
different sparsities. Given a globally pruned model (``prune.global_magnitude_prune`` without the
spared layers or the cap), the learner names the conv/linear layer that kept the largest fraction
of its weights (``least_pruned``) and that fraction (``kept``, in [0, 1]).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from . import Exercise, WrongAnswer, as_number

NAME = "least_pruned_layer"
TOLERANCE = 1e-3  # kept may be rounded to three decimals
EXAMPLE_SPARSITY = 0.9  # the sparsity of the example model (the top of the lesson's sweeps)


def kept_fractions(model: nn.Module) -> dict[str, float]:
    """Fraction of non-zero weights of every Conv2d and Linear layer, by layer name."""
    from ..prune import sparsity  # lazy: importing the exercise list needs no torchvision

    return {name: 1.0 - zeros for name, zeros in sparsity(model).per_layer.items()}


def solution(*, model: nn.Module) -> dict[str, Any]:
    """The layer with the largest fraction of non-zero weights, and that fraction."""
    from deploylab import prune

    per_layer = prune.sparsity(model).per_layer  # layer name -> fraction of its weights that are zero
    least_pruned = min(per_layer, key=per_layer.get)
    return {"least_pruned": least_pruned, "kept": 1 - per_layer[least_pruned]}


def check(answers: dict[str, Any], *, model: nn.Module) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    kept_by_layer = kept_fractions(model)
    layer, kept = answers["least_pruned"], answers["kept"]
    kept = as_number(kept)
    if not isinstance(layer, str) or layer not in kept_by_layer:
        raise WrongAnswer(f"least_pruned must name a Conv2d or Linear layer as prune.sparsity(model).per_layer spells it "
                          f"(e.g. {next(iter(kept_by_layer))!r}), got {layer!r}")
    if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not math.isfinite(kept):
        raise WrongAnswer(f"kept must be a number (a fraction in [0, 1]), got {kept!r}")
    if not 0 <= kept <= 1:
        raise WrongAnswer(f"kept is a fraction in [0, 1], not a percentage: got {kept}")
    best = max(kept_by_layer.values())
    if kept_by_layer[layer] < best:
        raise WrongAnswer(f"{layer} keeps {kept_by_layer[layer]:.1%} of its weights, but another layer keeps more; "
                          f"per_layer holds the fraction of zeros, so look for its smallest value")
    if abs(kept - best) > TOLERANCE:
        hint = " (that is the fraction pruned: kept = 1 - sparsity)" if abs(kept - (1 - best)) <= TOLERANCE else ""
        raise WrongAnswer(f"right layer, but kept={kept} is not the fraction of its weights that are non-zero{hint}")
    emptied = sum(1 for v in kept_by_layer.values() if v == 0)
    rest = (f"{emptied} layer(s) kept none at all: a global ranking can empty a whole layer" if emptied
            else f"the most pruned layer keeps {min(kept_by_layer.values()):.1%}")
    return f"{layer} keeps {best:.1%} of its weights; {rest}"


def example_inputs() -> dict[str, Any]:
    """The shipped student, globally pruned at :data:`EXAMPLE_SPARSITY` without fine-tuning (no data needed)."""
    from deploylab import assets, prune

    student = assets.student("workshop", build=False).model
    return {"model": prune.make_permanent(prune.global_magnitude_prune(student, EXAMPLE_SPARSITY))}


def wrong_answers(answers: dict[str, Any], *, model: nn.Module) -> list[dict[str, Any]]:
    """Near misses: the runner-up layer, the right layer with its sparsity instead of its kept fraction, the most pruned layer."""
    kept_by_layer = kept_fractions(model)
    right, kept = answers["least_pruned"], answers["kept"]
    best = kept_by_layer[right]
    others = sorted((n for n in kept_by_layer if kept_by_layer[n] < best), key=kept_by_layer.get, reverse=True)
    wrong = [{"least_pruned": name, "kept": kept_by_layer[name]} for name in dict.fromkeys(others[:1] + others[-1:])]
    wrong_kept = 1 - kept if abs(1 - 2 * kept) > 10 * TOLERANCE else max(0.0, kept - 0.1)
    wrong.append({"least_pruned": right, "kept": wrong_kept})
    wrong.append({"least_pruned": right, "kept": 100 * kept})  # a percentage, not a fraction
    return wrong


EXERCISE = Exercise(
    name=NAME,
    lesson="02_pruning",
    answers=("least_pruned", "kept"),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
