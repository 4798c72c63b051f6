"""Lesson 02's choices: which layers can lose channels, and which pruned student is kept.

The sensitivity scan prunes one layer at a time (torch-pruning's dependency graph, no fine-tune) and
scores every point against the unpruned model on the same *validation* images with a paired
bootstrap interval; :func:`ratios_from_scan` turns it into per-layer ratios, and
:func:`choose_saved` picks the student the later lessons load. Every function that feeds a choice
refuses test images (:func:`deploylab.data.refuse_test_images`). Split out of :mod:`deploylab.prune`
(the pruning itself, sizes, fine-tuning, save/load).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import data, stats
from .prune import check_amount
from .train import predict


def scan_layers(model: nn.Module, n: int) -> list[str]:
    """Up to ``n`` convolutions, evenly spread over the depth, whose output channels can be pruned alone.

    For MobileNetV2 these are the 1x1 expansion convolutions of the inverted-residual blocks, for
    ResNet50 the first 1x1 convolution of each bottleneck: their channels feed only the next
    convolution of the same block, never a residual addition.
    """
    if n < 1:
        raise ValueError(f"scan at least one layer, got n={n}")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and (name.endswith("conv.0.0") and m.groups == 1 or (name.startswith("layer") and name.endswith(".conv1")))]
    if not names:
        raise ValueError("found no block-internal convolutions to scan (expected MobileNetV2 or ResNet)")
    if len(names) <= n:
        return names
    return [names[round(i * (len(names) - 1) / (n - 1))] for i in range(n)] if n > 1 else [names[len(names) // 2]]


def prune_layer_channels(model: nn.Module, layer: str, ratio: float, example: torch.Tensor) -> int:
    """Remove the ``ratio`` fraction of ``layer``'s output channels with the smallest L1 norm, in place.

    Uses torch-pruning's dependency graph: the group it returns also shrinks the BatchNorm after
    the layer and the input channels of every consumer. Returns the number of channels removed.
    """
    import torch_pruning as tp

    ratio = check_amount(ratio, what="pruning ratio")
    conv = model.get_submodule(layer)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{layer} is a {type(conv).__name__}, not a Conv2d")
    k = int(ratio * conv.out_channels)
    if k == 0:
        return 0
    idxs = conv.weight.detach().abs().flatten(1).sum(1).argsort()[:k].tolist()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
    if not dg.check_pruning_group(group):
        raise RuntimeError(f"pruning {k} channels of {layer} would leave a layer with no channels; use a smaller ratio")
    group.prune()
    return k


def sensitivity_scan(model: nn.Module, layers: Iterable[str], ratios: Iterable[float], example: torch.Tensor,
                     x_val: torch.Tensor, y_val: torch.Tensor, *, resamples: int = 1000) -> dict[str, dict[float, stats.Score]]:
    """Each layer alone channel-pruned at each ratio (no fine-tune), scored against the unpruned model on validation images.

    Every point is a :class:`deploylab.stats.Score`: the pruned copy's accuracy and its paired difference
    with ``model`` on the same images (a bootstrap interval), so that :func:`ratios_from_scan` can tell a
    real loss from a few images. The scan chooses ratios: test images are refused.
    """
    data.refuse_test_images(x_val, "sensitivity_scan chooses pruning ratios")
    with torch.inference_mode():
        reference = predict(copy.deepcopy(model).eval(), x_val)
    out: dict[str, dict[float, stats.Score]] = {}
    for layer in layers:
        out[layer] = {}
        for r in ratios:
            m = copy.deepcopy(model).eval()
            prune_layer_channels(m, layer, r, example)
            with torch.inference_mode():
                out[layer][r] = stats.score(predict(m, x_val), y_val, reference, resamples=resamples)
    return out


def ratios_from_scan(scan: Mapping[str, Mapping[float, stats.Score]], max_drop_points: float) -> dict[str, float]:
    """Per layer, the largest scanned ratio whose loss is *surely* within ``max_drop_points`` (0 if none).

    "Surely": the whole 95% paired interval of the difference stays above ``-max_drop_points``
    (:func:`deploylab.stats.within_tolerance`). A loss whose interval reaches past the bound could be
    larger than allowed, so the smaller change (the lower ratio) is kept.
    """
    if max_drop_points < 0:
        raise ValueError(f"max_drop_points is an accuracy loss >= 0, got {max_drop_points}")
    return {layer: max([r for r, s in per.items() if stats.within_tolerance(s, max_drop_points)], default=0.0)
            for layer, per in scan.items()}


def validation_scores(candidates: Mapping[str, nn.Module], dense: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                      *, resamples: int = 2000) -> dict[str, stats.Score]:
    """Each candidate's accuracy and paired difference with ``dense`` on the same validation images (test refused)."""
    data.refuse_test_images(x_val, "validation_scores feeds the choice of the saved student")
    with torch.inference_mode():
        reference = predict(dense, x_val)
        return {name: stats.score(predict(m, x_val), y_val, reference, resamples=resamples) for name, m in candidates.items()}


def choose_saved(scores: Mapping[str, stats.Score], p50_ms: Mapping[str, float], tolerance_points: float = 1.0) -> tuple[str, str]:
    """The student to save and the rule that picked it: ``(name, rule)``.

    The fastest (``p50_ms``) among the candidates whose paired interval against the dense student on
    validation images stays within ``tolerance_points`` (:func:`deploylab.stats.within_tolerance`);
    if none is, the most accurate on validation images. Never on test images: the test set scores
    the saved student once, afterwards.
    """
    if not scores:
        raise ValueError("no candidates to choose from")
    within = [n for n, s in scores.items() if stats.within_tolerance(s, tolerance_points)]
    if within:
        name = min(within, key=lambda n: p50_ms[n])
        return name, (f"the fastest of those whose 95% interval against dense stays within {tolerance_points:g} point "
                      f"on {scores[name].images:,} validation images ({', '.join(within)})")
    name = max(scores, key=lambda n: scores[n].accuracy)
    return name, (f"the most accurate on {scores[name].images:,} validation images: none surely stays within "
                  f"{tolerance_points:g} point of dense")


def plot_sensitivity(scan: Mapping[str, Mapping[float, stats.Score]], baseline: float, title: str = ""):
    """One line per layer: validation accuracy (%) against the fraction of its channels removed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for layer, per in scan.items():
        rs = sorted(per)
        ax.plot([0.0, *rs], [100 * baseline, *(100 * per[r].accuracy for r in rs)], marker="o", label=layer)
    ax.set_xlabel("fraction of the layer's output channels removed (no fine-tune)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "sensitivity of each layer to channel pruning", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on training images ``x``, in place; returns ``model`` in eval mode.

    Removing channels changes what each BatchNorm sees, so its stored mean and variance no longer fit:
    a few forward passes in train mode (no gradient, no weight update, ``momentum=None``: a plain
    average over the batches) are the cheapest recovery after pruning, seconds instead of a fine-tune.
    The images are training images: this is part of making the model, not of scoring it.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for xb in x.split(batch_size):
            model(xb)
    return model.eval()
