"""Quantization-aware training for lesson 01: the fine-tune of a ``prepare_qat_pt2e`` model, and how to read its loss.

Lesson 01 shows the loop itself in a cell (fake quantization, distillation from the fp32 model, batch norm and
observers frozen part-way); :func:`qat_finetune` is the same loop as a tested function, for the code that
needs it outside the notebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def qat_finetune(prepared: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, lr: float,
                 soft_targets: torch.Tensor | None = None, temperature: float = 2.0, freeze_bn_at: float = 0.5,
                 freeze_observers_at: float = 0.75, seed: int = 0) -> list[float]:
    """One shuffled pass over ``(x, y)`` with a ``prepare_qat_pt2e`` model; returns the loss of every step.

    The usual QAT recipe, scaled to a few thousand images:

    - SGD with momentum at a small learning rate (~1/100 of the original training's): the weights are
      trained already, they only adapt to the INT8 rounding;
    - with ``soft_targets`` (the fp32 model's logits on ``x``), distillation from the fp32 model
      (:func:`deploylab.distill.kd_loss`, ``alpha=1``: match its softened predictions, no labels): the
      fine-tune learns to compute what the fp32 model computed, not to re-fit the labels; without
      them, cross-entropy on ``y``;
    - batch norm frozen after ``freeze_bn_at`` of the steps (``move_exported_model_to_eval``: the graph's
      batch norm then uses its running statistics, as the converted model will), and the observers
      after ``freeze_observers_at`` (``disable_observer``: the scales stop moving, so the last steps
      train against the scales ``convert_pt2e`` will use).

    The model is left in its eval form, ready for ``convert_pt2e``.
    """
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval, move_exported_model_to_train

    from .distill import kd_loss

    steps = len(x) // batch_size
    if steps < 1:
        raise ValueError(f"QAT needs at least one full batch: {len(x)} images for batch size {batch_size}")
    if soft_targets is not None and soft_targets.shape[0] != len(x):
        raise ValueError(f"soft_targets must hold one row of logits per image: {soft_targets.shape[0]} for {len(x)}")
    if not 0.0 <= freeze_bn_at <= freeze_observers_at <= 1.0:
        raise ValueError("need 0 <= freeze_bn_at <= freeze_observers_at <= 1 (fractions of the steps)")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD([p for p in prepared.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses: list[float] = []
    move_exported_model_to_train(prepared)
    for step in range(steps):
        if step == int(freeze_bn_at * steps):
            move_exported_model_to_eval(prepared)
        if step == int(freeze_observers_at * steps):
            prepared.apply(disable_observer)
        idx = order[step * batch_size : (step + 1) * batch_size]
        logits = prepared(x[idx])
        if soft_targets is None:
            loss = F.cross_entropy(logits, y[idx])
        else:
            loss = kd_loss(logits, soft_targets[idx], y[idx], temperature=temperature, alpha=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    move_exported_model_to_eval(prepared)
    return losses


def loss_trend(losses: list[float], window: int = 10) -> tuple[float, float]:
    """Mean loss of the first and of the last ``window`` steps (one batch's loss is too noisy to compare)."""
    if not losses:
        raise ValueError("no losses")
    w = max(1, min(window, len(losses) // 2 or 1))
    return sum(losses[:w]) / w, sum(losses[-w:]) / w
