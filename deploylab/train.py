"""Training and evaluation loops (in the spirit of torchvision's references/classification).

Training runs on the GPU when there is one, otherwise on the CPU; it uses bf16 autocast where the
hardware has fast bf16 (any CUDA GPU, CPUs with AVX512-BF16 or AMX), fp32 elsewhere. Evaluation
always runs the fp32 model, because that is the model that gets deployed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import config, data
from .hardware import cpu_flags


@dataclass(frozen=True)
class Recipe:
    """How a model is trained. Epochs and augmentation come from the profile."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.05  # peak learning rate of SGD with Nesterov momentum, one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment: bool = True  # random crop (padding 4) + horizontal flip
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it fast, else None (train in fp32)."""
    if device.type == "cuda":
        return torch.bfloat16
    flags = cpu_flags()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return torch.bfloat16
    return None


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors (the whole dataset fits in memory, so no DataLoader)."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable,
               optimizer: torch.optim.Optimizer, amp: torch.dtype | None) -> float:
    """One optimisation step; returns the loss."""
    with torch.autocast(inputs.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = loss_fn(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | None = None, desc: str = "train") -> dict[str, list[float]]:
    """Train ``model`` on ``(x, y)`` following ``recipe``; returns the per-epoch mean loss.

    ``loss_fn(logits, targets)`` defaults to label-smoothed cross-entropy; the distillation lesson
    passes its own. The model comes back on the CPU in eval mode.
    """
    if recipe.epochs < 1:
        raise ValueError(f"a recipe needs at least one epoch, got {recipe.epochs}")
    device = device or config.device()
    amp = autocast_dtype(device)
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, label_smoothing=recipe.label_smoothing))
    gen = torch.Generator().manual_seed(recipe.seed)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=True)
    steps = recipe.epochs * math.ceil(len(x) / recipe.batch_size)
    if steps < 5:
        raise ValueError(f"{steps} optimiser step(s) are too few for the one-cycle schedule (1 step: learning rate ~0; "
                         f"4 steps: OneCycleLR divides by zero); train on more images or use a smaller batch_size")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps, pct_start=0.25)
    history: dict[str, list[float]] = {"loss": []}
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for epoch in range(recipe.epochs):
            model.train()
            total, count = 0.0, 0
            for xb, yb in batches(x, y, recipe.batch_size, shuffle=True, generator=gen):
                if recipe.augment:
                    xb = data.augment(xb, generator=gen)
                xb = xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                loss = train_step(model, xb, yb.to(device), loss_fn, optimizer, amp)
                scheduler.step()
                total, count = total + loss * len(xb), count + len(xb)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.3f}")
            history["loss"].append(total / count)
    model.cpu().eval()
    return history


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """Logits of ``model`` for all of ``x`` in fp32, computed in batches (on ``device`` if given; returned on the CPU)."""
    model.eval()
    if device is None:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.to(device)
    try:
        return torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.cpu()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} labels")
    return (logits.argmax(1) == labels).float().mean().item()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return accuracy(predict(model, x, batch_size), y)


def timed(fn: Callable, *args, **kwargs):
    """Run ``fn`` and return ``(result, seconds)``."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
