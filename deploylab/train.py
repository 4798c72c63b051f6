"""Training and evaluation loops (in the spirit of torchvision's references/classification).

Training runs on the GPU when there is one, otherwise on the CPU; it uses bf16 autocast on CUDA GPUs
and, on CPUs with AVX512-BF16 or AMX, only where a short probe measures it faster than fp32 for the
model at hand (:func:`choose_autocast`); fp32 elsewhere. Evaluation always runs the fp32 model,
because that is the model that gets deployed.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import statistics
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import config, data
from .files import atomic_path
from .hardware import cpu_flags

log = logging.getLogger(__name__)


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

    def steps(self, n_images: int) -> int:
        """Optimiser steps of the whole run on ``n_images`` training images."""
        return self.epochs * math.ceil(n_images / self.batch_size)


class ResumeError(RuntimeError):
    """A resume checkpoint belongs to another training run (another recipe, model or data)."""


def load_resume(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state of an interrupted run at ``path``, or None to start from scratch.

    A file that cannot be read (truncated by a killed process, overwritten) is reported and
    discarded: the run restarts from scratch, which costs time but never continues from garbage.
    A readable file made for another run (``identity``: recipe, architecture, data) is refused:
    continuing it would silently mix two recipes into one model.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("not a deploylab resume checkpoint")
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        log.warning("resume checkpoint %s is corrupt (%s: %s); this model restarts from scratch", path, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return None
    if state.get("identity") != identity:
        have, want = state.get("identity") or {}, identity
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ResumeError(f"resume checkpoint {path} was made by another training run (differs in: {', '.join(diff)}); "
                          f"refusing to continue it. Start over with `deploylab prepare --force` (or delete {path})")
    return state


def save_resume(path: Path, state: dict[str, Any]) -> None:
    """Write a resume checkpoint atomically (a kill during the write leaves the previous one intact)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def bf16_capable(device: torch.device) -> bool:
    """Whether ``device`` has bf16 arithmetic in hardware: any CUDA GPU, a CPU with AVX512-BF16 or AMX."""
    return device.type == "cuda" or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


_PROBED: dict[tuple, tuple[torch.dtype | None, dict[str, Any]]] = {}


def choose_autocast(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, loss_fn: Callable,
                    device: torch.device, rounds: int = 3) -> tuple[torch.dtype | None, dict[str, Any]]:
    """bf16 autocast where it trains ``model`` faster than fp32, else None; and the measured images/s.

    bf16 hardware does not make every model faster: on 2 cores of an AMX Xeon a width-0.5
    MobileNetV2 trained 1.8x faster in fp32 (its depthwise convolutions), a ResNet50 1.1x faster in
    bf16. So on such a CPU a copy of the model takes a few optimiser steps on the batch ``(xb, yb)``
    in each precision, interleaved, and the faster median wins (cached per architecture and batch
    shape for the rest of the process). CUDA GPUs always get bf16; CPUs without bf16 get fp32.
    """
    if device.type == "cuda":
        return torch.bfloat16, {}
    if not bf16_capable(device):
        return None, {}
    key = (type(model).__name__, sum(p.numel() for p in model.parameters()), tuple(xb.shape), device.type)
    if key not in _PROBED:
        try:
            probe = copy.deepcopy(model).to(device).train()
        except RuntimeError as e:  # e.g. torch.nn.utils.prune's computed weights cannot be deep-copied
            log.info("bf16 probe skipped for %s (%s): training in fp32", key[0], str(e)[:80])
            _PROBED[key] = None, {"skipped": "the model cannot be copied for the probe"}
            return _PROBED[key]
        rng = torch.get_rng_state()  # the probe's dropout must not shift the training run's random numbers
        optimizer = torch.optim.SGD(probe.parameters(), lr=1e-3, momentum=0.9)
        xb = xb.to(device).contiguous(memory_format=memory_format_for(probe, device))
        yb = yb.to(device)
        rates: dict[torch.dtype | None, list[float]] = {None: [], torch.bfloat16: []}
        for amp in rates:  # warm-up: the first step of each precision pays for kernel selection
            train_step(probe, xb, yb, loss_fn, optimizer, amp)
        for r in range(rounds):
            for amp in (list(rates) if r % 2 == 0 else list(rates)[::-1]):
                started = time.perf_counter()
                train_step(probe, xb, yb, loss_fn, optimizer, amp)
                rates[amp].append(len(xb) / (time.perf_counter() - started))
        torch.set_rng_state(rng)
        fp32, bf16 = statistics.median(rates[None]), statistics.median(rates[torch.bfloat16])
        measured = {"float32_images_per_s": round(fp32, 1), "bfloat16_images_per_s": round(bf16, 1)}
        _PROBED[key] = (torch.bfloat16 if bf16 > fp32 else None), measured
        log.info("bf16 probe for %s: fp32 %.0f img/s, bf16 %.0f img/s", key[0], fp32, bf16)
    return _PROBED[key]


def precision_name(amp: torch.dtype | None) -> str:
    """``"bfloat16 autocast"`` or ``"float32"``: how a run computed, as recorded in its metadata."""
    return "float32" if amp is None else f"{str(amp).removeprefix('torch.')} autocast"


def memory_format_for(model: nn.Module, device: torch.device) -> torch.memory_format:
    """The memory format to train ``model`` in: channels-last, except for grouped convolutions on a CPU.

    Measured on 2 AVX2 cores (torch 2.14.1, batch 128 / 32, one SGD step): ResNet50 trains at 107
    images/s in channels-last and 4 in the default (contiguous) format, while MobileNetV2 -- whose
    depthwise convolutions are grouped -- trains at 37 in channels-last and 228 contiguous.
    """
    if device.type == "cuda":
        return torch.channels_last
    grouped = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    return torch.contiguous_format if grouped else torch.channels_last


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
        device: torch.device | None = None, desc: str = "train", resume: Path | None = None,
        resume_identity: dict[str, Any] | None = None, bar: tqdm | None = None,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``(x, y)`` following ``recipe``; returns the per-epoch mean loss and the seconds.

    ``loss_fn(logits, targets)`` defaults to label-smoothed cross-entropy; the distillation lesson
    passes its own. The model comes back on the CPU in eval mode.

    With ``resume`` (a file path), the complete state -- model, optimiser, schedule, random number
    generators, epoch, loss history, seconds spent -- is saved there after every epoch, and a run
    that finds the file continues after its last finished epoch (see :func:`load_resume`;
    ``resume_identity`` names the run, e.g. architecture and data, in addition to the recipe).
    The caller deletes the file once the trained model is safely saved. ``bar`` is a progress bar
    to advance instead of a new one (one bar, one ETA, over several models). With ``validation``
    (held-out images, never test images), the accuracy after each epoch goes into the history: the
    learning curve of a run that takes hours, readable while it is still running.
    """
    if recipe.epochs < 1:
        raise ValueError(f"a recipe needs at least one epoch, got {recipe.epochs}")
    device = device or config.device()
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, label_smoothing=recipe.label_smoothing))
    gen = torch.Generator().manual_seed(recipe.seed)
    memory_format = memory_format_for(model, device)
    model = model.to(device).to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=True)
    steps_per_epoch = math.ceil(len(x) / recipe.batch_size)
    steps = recipe.steps(len(x))
    if steps < 5:
        raise ValueError(f"{steps} optimiser step(s) are too few for the one-cycle schedule (1 step: learning rate ~0; "
                         f"4 steps: OneCycleLR divides by zero); train on more images or use a smaller batch_size")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps, pct_start=0.25)
    # per-epoch seconds and load average show whether other work shared the cores during an epoch
    history: dict[str, Any] = {"loss": [], "seconds": 0.0, "epoch_seconds": [], "epoch_load_average": [],
                               "val_accuracy": [], "resumed_at_epochs": []}
    identity = {"recipe": recipe.to_dict(), "train_images": len(x), **(resume_identity or {})}
    state = load_resume(resume, identity) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        history["resumed_at_epochs"].append(state["epoch"])
        for key in ("epoch_seconds", "epoch_load_average", "val_accuracy"):  # checkpoints of an earlier version lack them
            history.setdefault(key, [])
        log.info("%s: resuming after epoch %d of %d (%s)", desc, state["epoch"], recipe.epochs, resume)
    if "precision" not in history:  # a resumed run keeps the precision it started with
        amp, probe = choose_autocast(model, x[: recipe.batch_size], y[: recipe.batch_size], loss_fn, device)
        history["precision"], history["precision_probe"] = precision_name(amp), probe
    amp = torch.bfloat16 if history["precision"] != "float32" else None
    start_epoch = state["epoch"] if state is not None else 0
    own_bar = bar is None
    bar = bar if bar is not None else tqdm(total=steps, desc=desc, unit="step")
    if own_bar and start_epoch:
        bar.update(start_epoch * steps_per_epoch)
    try:
        for epoch in range(start_epoch, recipe.epochs):
            started = time.perf_counter()
            model.train()
            total, count = 0.0, 0
            for xb, yb in batches(x, y, recipe.batch_size, shuffle=True, generator=gen):
                if recipe.augment:
                    xb = data.augment(xb, generator=gen)
                xb = xb.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                loss = train_step(model, xb, yb.to(device), loss_fn, optimizer, amp)
                scheduler.step()
                total, count = total + loss * len(xb), count + len(xb)
                bar.update(1)
                bar.set_postfix(model=desc, epoch=f"{epoch + 1}/{recipe.epochs}", loss=f"{total / count:.3f}")
            history["loss"].append(total / count)
            history["seconds"] += time.perf_counter() - started
            history["epoch_seconds"].append(round(time.perf_counter() - started, 1))
            history["epoch_load_average"].append(round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
            if validation is not None:
                history["val_accuracy"].append(round(_accuracy_on(model, *validation, device=device), 4))
                log.info("%s: epoch %d/%d, loss %.4f, validation accuracy %.4f", desc, epoch + 1, recipe.epochs,
                         history["loss"][-1], history["val_accuracy"][-1])
            if resume is not None:
                save_resume(resume, {"identity": identity, "epoch": epoch + 1, "model": model.state_dict(),
                                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                                     "history": history})
    finally:
        if own_bar:
            bar.close()
    model.cpu().eval()
    return history


@torch.inference_mode()
def _accuracy_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy of a model that stays on ``device`` (between training epochs; fit puts it back in train mode)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device).contiguous(memory_format=memory_format_for(model, device))
        correct += (model(xb).argmax(1).cpu() == y[i : i + batch_size]).sum().item()
    return correct / len(x)


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
