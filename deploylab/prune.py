"""Pruning: unstructured magnitude pruning (zeros in place) and structured channel pruning.

Two very different things share the name "pruning":

- *Unstructured* pruning (``torch.nn.utils.prune``) sets individual weights to zero. The tensors
  keep their shapes, so a dense kernel does exactly the same work: no speed-up, and the weights
  file only shrinks when it is compressed or stored in a sparse format.
- *Structured* pruning (the torch-pruning library) removes whole channels, following the
  dependency graph so that every layer that consumes a removed channel shrinks with it. The result
  is a smaller *dense* model: fewer parameters, fewer multiply-accumulates (MACs), lower latency.

A *global* magnitude ranking compares raw weights across layers whose scales differ (a BatchNorm
after each convolution rescales it), and at high sparsity it can empty a whole layer: "layer
collapse", after which the model predicts a constant. :func:`global_magnitude_prune` therefore
takes ``exclude`` (e.g. :func:`spared_layers`: the first convolution, the depthwise convolutions
and the classifier) and ``max_layer_sparsity`` (a cap per layer).

This module holds the plumbing of lesson 02 (sizes per profile, sparsity accounting, size
measurements, fine-tuning with or without distillation, and saving/loading a
pruned model without pickle); the notebook shows the library calls themselves.
"""

from __future__ import annotations

import gzip
import io
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from . import artefacts, bench, distill, models
from .config import Profile
from .files import shown
from .train import Recipe, fit

LESSON = "pruning"
PRUNABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class PruneSizes:
    """How much work lesson 02 does in one profile (sizes only; the code path is the same).

    Every image count is a prefix of the profile's training images (``data.tensors("train",
    profile.train_images)``, the images whose teacher logits ``assets.logits`` caches); None: all.
    """

    sparsities: tuple[float, ...]  # unstructured sweep: fraction of the *ranked* weights zeroed
    max_layer_sparsity: float  # the fixed sweep's cap: no ranked layer loses more than this
    finetune_images: int | None  # training images of each unstructured fine-tune
    finetune_epochs: int
    student_ratios: tuple[float, ...]  # structured channel-pruning ratios for the student
    step_images: int | None  # images of the short fine-tune after each iterative step but the last
    student_finetune_images: int | None  # the last step's fine-tune, with knowledge distillation
    student_finetune_epochs: int
    teacher_ratio: float  # structured channel-pruning ratio for the teacher
    teacher_finetune_images: int | None  # per iterative step (ResNet50 trains slowly on a CPU)
    teacher_finetune_epochs: int
    teacher_eval_images: int | None  # test images for the teacher's rows (None: the whole test set)
    iterative_steps: int  # prune a little, fine-tune, prune again...
    sensitivity_layers: int  # layers of the student scanned one at a time
    sensitivity_ratios: tuple[float, ...]
    sensitivity_images: int  # validation images per point of the scan (never test images)
    finetune_lr: float = 0.01  # peak learning rate of a short fine-tune (the student trained at 0.05)
    student_finetune_lr: float = 0.02  # the longer distillation fine-tune of a channel-pruned student

    def to_dict(self) -> dict:
        return asdict(self)


# Top sparsity: a quick check on the shipped student (2,000 test images, one epoch at lr 0.01, no
# augmentation) gave, with the spared layers and a 95% cap, 88.4% at 80% and 80.8% at 90% after
# 4,096 images, 86.3% at 90% after 12,000; with the spared layers but no cap, 90% collapsed (9.5%:
# features.18.0 was emptied). 95% would leave the largest layers at the cap, little more than uniform 95% pruning,
# and needs a cap above 95%: the sweeps stop at 90%, where `full` (16,384 images) stays above 80%.
#
# Time estimates on 2 AVX2 cores (AMD EPYC, 2026-12-03): the student trains at ~250 images/s (more
# when channel-pruned) and predicts ~2,500 images/s; the teacher predicts ~100-470 images/s and
# trains at ~100 images/s (channels-last; the channel-pruned one faster).
SIZES: dict[str, PruneSizes] = {
    # CI: every step runs, on a handful of images (the smoke models are near chance anyway): ~1-2 minutes.
    "smoke": PruneSizes(
        sparsities=(0.5, 0.9), max_layer_sparsity=0.95, finetune_images=256, finetune_epochs=1,
        student_ratios=(0.5,), step_images=256, student_finetune_images=256, student_finetune_epochs=1,
        teacher_ratio=0.35, teacher_finetune_images=64, teacher_finetune_epochs=1, teacher_eval_images=128,
        iterative_steps=2, sensitivity_layers=3, sensitivity_ratios=(0.5, 0.9), sensitivity_images=128,
    ),
    # A live session, ~8-9 minutes on 2 AVX2 cores: teacher logits on 12,000 images ~1-2 min (cached by
    # lesson 03); sweep 8 x 4,096 images ~2 min; scan ~20 s; 3 students x (4,096 + 12,000 images)
    # ~3 min; teacher 2 x 2,048 images and 10,000 scored ~1 min; exports, benchmark, the rest ~1.5 min.
    "workshop": PruneSizes(
        sparsities=(0.5, 0.7, 0.8, 0.9), max_layer_sparsity=0.95, finetune_images=4096, finetune_epochs=1,
        student_ratios=(0.25, 0.5), step_images=4096, student_finetune_images=None, student_finetune_epochs=1,
        teacher_ratio=0.35, teacher_finetune_images=2048, teacher_finetune_epochs=1, teacher_eval_images=None,
        iterative_steps=2, sensitivity_layers=6, sensitivity_ratios=(0.25, 0.5, 0.75), sensitivity_images=1000,
    ),
    # The headline figures, ~35 minutes on 2 cores: teacher logits on 55,000 images, both views (cached
    # by lesson 03, else ~2.5 min on AVX-512); sweep 8 x 12,000 images ~6 min; scan ~1 min; 3 students
    # x (2 x 4,096 + 4 x 55,000 images) x 2 views ~26 min (~900 images/s); teacher 3 x 2,048 images ~1
    # min and 10,000 scored ~1 min; exports, benchmark and the rest ~4 min. Epochs of the last student
    # fine-tune: ch-25% with the view-matched distillation reached 89.5 / 90.0 / 91.0 / 91.3% on the
    # 5,000 validation images after epochs 1-4 of 4 (dense student 91.0%; AVX-512 EPYC, 2026-12-06);
    # one epoch with random crops against unaugmented logits had ended 2.6 points below dense.
    "full": PruneSizes(
        sparsities=(0.5, 0.7, 0.8, 0.9), max_layer_sparsity=0.95, finetune_images=12_000, finetune_epochs=1,
        student_ratios=(0.25, 0.5), step_images=4096, student_finetune_images=None, student_finetune_epochs=4,
        teacher_ratio=0.35, teacher_finetune_images=2048, teacher_finetune_epochs=1, teacher_eval_images=None,
        iterative_steps=3, sensitivity_layers=8, sensitivity_ratios=(0.25, 0.5, 0.75), sensitivity_images=2000,
    ),
}


def sizes(profile: Profile) -> PruneSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


# --------------------------------------------------------------------------- validation


def check_amount(amount: float, *, what: str = "sparsity", allow_zero: bool = True) -> float:
    """Validate a pruning fraction: a number in [0, 1). 1 would remove every weight or channel.

    0 is a valid no-op (the dense baseline) unless ``allow_zero`` is False.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1), got {type(amount).__name__} {amount!r}")
    amount = float(amount)
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{what} must be in [0, 1), got {amount}")
    if amount >= 1:
        raise ValueError(
            f"{what}={amount} would remove every weight (or channel) and leave a model that predicts a constant; "
            f"use a fraction below 1, e.g. 0.9"
        )
    if amount == 0 and not allow_zero:
        raise ValueError(f"{what}=0 prunes nothing; pass a fraction in (0, 1)")
    return amount


# --------------------------------------------------------------------------- unstructured


def spared_layers(model: nn.Module) -> list[str]:
    """The conv/linear layers a global magnitude ranking should leave alone.

    - the first convolution: few weights, and every later layer depends on its features;
    - every depthwise convolution (``groups == in_channels > 1``): one small filter per channel
      (3x3 in MobileNetV2), and a channel whose filter is all zeros is dead for the whole block;
    - the classifier: its 10 outputs are the classes.

    Magnitudes are not comparable across layers (a BatchNorm after a convolution rescales it at
    will), so a global ranking can empty such a layer and the whole model predicts a constant
    ("layer collapse"). Returns layer names as ``model.named_modules()`` spells them.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if not convs:
        raise ValueError("the model has no Conv2d or Linear layers to prune")
    spared = {convs[0][0]}
    spared |= {n for n, m in convs if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}
    spared.add(next(n for n, m in model.named_modules() if m is classifier(model)))
    return [n for n, _ in convs if n in spared]


def prunable_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every Conv2d and Linear not named in ``exclude``: what global pruning ranks."""
    exclude = set(exclude)
    layers = dict(model.named_modules())
    if exclude - set(layers):
        raise ValueError(f"exclude names layers the model lacks: {sorted(exclude - set(layers))[:3]}")
    params = [(m, "weight") for n, m in layers.items() if isinstance(m, PRUNABLE) and n not in exclude]
    if not params:
        raise ValueError("no Conv2d or Linear layers left to prune (the model has none, or all are excluded)")
    return params


def _capped_scores(params: list[tuple[nn.Module, str]], cap: float) -> dict[tuple[nn.Module, str], torch.Tensor]:
    """|weight| per layer, with each layer's largest ``1 - cap`` fraction set to the largest float (never pruned)."""
    scores = {}
    for module, name in params:
        w = getattr(module, name).detach().abs()
        keep = math.ceil((1 - cap) * w.numel() - 1e-9)  # at least this many weights of the layer survive
        s = w.flatten().clone()
        s[s.topk(keep).indices] = torch.finfo(s.dtype).max  # finite: torch multiplies the scores by any old mask
        scores[(module, name)] = s.view_as(w)
    return scores


def global_magnitude_prune(model: nn.Module, amount: float, *, exclude: Iterable[str] = (),
                           max_layer_sparsity: float | None = None) -> nn.Module:
    """Zero the ``amount`` fraction of smallest-magnitude conv/linear weights, ranked over all ranked layers.

    Uses ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``; the pruned weights
    become ``weight_orig * weight_mask`` (so fine-tuning keeps them at zero) until
    :func:`make_permanent`. Works in place and returns the model.

    ``exclude``: layer names left out of the ranking (and never pruned), e.g. :func:`spared_layers`;
    ``amount`` is then the fraction of the *ranked* weights, and the model-wide sparsity
    (:func:`sparsity`) is lower. ``max_layer_sparsity``: no ranked layer loses more than this
    fraction of its weights (its largest weights get the largest importance score); the rest of
    the ``amount`` comes from the other layers, still smallest magnitude first.
    """
    amount = check_amount(amount)
    params = prunable_parameters(model, exclude)
    scores = None
    if max_layer_sparsity is not None:
        cap = check_amount(max_layer_sparsity, what="max_layer_sparsity", allow_zero=False)
        scores = _capped_scores(params, cap)
        total = sum(getattr(m, n).numel() for m, n in params)
        free = sum(int((s < torch.finfo(s.dtype).max).sum()) for s in scores.values())
        if round(amount * total) > free:
            raise ValueError(f"amount={amount} needs {round(amount * total):,} zeros but max_layer_sparsity={cap} "
                             f"allows {free:,} ({free / total:.1%} of the ranked weights): prune less or raise the cap")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount, importance_scores=scores)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """``prune.remove`` on every pruned parameter: masks are folded into plain dense weights."""
    for module in model.modules():
        for name in [k[: -len("_orig")] for k, _ in list(module.named_parameters(recurse=False)) if k.endswith("_orig")]:
            prune.remove(module, name)
    return model


@dataclass(frozen=True)
class Sparsity:
    """Zeros among the prunable (conv and linear) weights, overall and per layer."""

    zeros: int
    total: int
    per_layer: dict[str, float]

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def sparsity(model: nn.Module) -> Sparsity:
    """Count exact zeros in every Conv2d/Linear weight (works before and after ``prune.remove``)."""
    zeros = total = 0
    per_layer = {}
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE):
            w = m.weight  # with a pruning mask in place this is weight_orig * weight_mask
            z = int((w == 0).sum())
            zeros, total = zeros + z, total + w.numel()
            per_layer[name] = z / w.numel()
    if total == 0:
        raise ValueError("the model has no Conv2d or Linear weights")
    return Sparsity(zeros, total, per_layer)


def plot_layer_sparsity(per_layer: Mapping[str, Mapping[str, float]], spared: Iterable[str] = (), title: str = ""):
    """Bars of each layer's fraction of zero weights (%), one colour per model (``{label: Sparsity.per_layer}``).

    Layers named in ``spared`` get a grey band: the ones the fixed ranking leaves out.
    """
    import matplotlib.pyplot as plt

    labels = list(per_layer)
    layers = list(per_layer[labels[0]])
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(labels)
    for i in (i for i, name in enumerate(layers) if name in set(spared)):
        ax.axvspan(i - 0.45, i + 0.45, color="0.9", zorder=0)
    for k, label in enumerate(labels):
        ax.bar([i - 0.4 + (k + 0.5) * width for i in range(len(layers))],
               [100 * per_layer[label][name] for name in layers], width, label=label)
    ax.axhline(100, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=5)
    ax.set_ylabel("weights that are zero (%)")
    ax.set_title(title or "sparsity of each layer (grey: left out of the fixed ranking)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_sweep(rows: Iterable[Mapping[str, Any]], baseline: float, title: str = ""):
    """Accuracy (%) against model-wide sparsity, before and after fine-tuning, one colour per method.

    ``rows``: dicts with ``method``, ``model_sparsity``, ``before`` and ``after`` (fractions).
    """
    import matplotlib.pyplot as plt

    rows = list(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r["model_sparsity"], r["before"], r["after"]) for r in rows if r["method"] == method)
        xs = [100 * p[0] for p in pts]
        ax.plot(xs, [100 * p[1] for p in pts], ls="--", marker="o", color=f"C{k}", label=f"{method}: right after pruning")
        ax.plot(xs, [100 * p[2] for p in pts], ls="-", marker="o", color=f"C{k}", label=f"{method}: after fine-tuning")
    ax.axhline(100 * baseline, color="k", lw=0.8, ls=":", label="dense")
    ax.set_xlabel("model-wide sparsity (% of conv/linear weights that are zero)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "unstructured pruning sweep", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _state_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def storage_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights stored three ways: dense, dense + gzip, and sparse (CSR) + dense rest.

    ``dense``: ``torch.save(state_dict)``, what ships by default -- zeros cost 4 bytes like any float.
    ``gzip``: the same bytes compressed (zeros compress well; the model must be unzipped to run).
    ``sparse_csr``: every conv/linear weight as a CSR matrix (values + int64 column indices, i.e.
    ~12 bytes per non-zero instead of 4 per weight), so it only wins above ~2/3 sparsity.
    Call on a model after :func:`make_permanent` (or one that was never pruned).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if any(k.endswith("_orig") or k.endswith("_mask") for k in state):
        raise RuntimeError("the model still carries pruning masks (weight_orig/weight_mask): call make_permanent(model) first")
    dense = _state_bytes(state)
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we only measure bytes here
        warnings.simplefilter("ignore", UserWarning)
        sparse = {k: (v.flatten(1).to_sparse_csr() if k in weights else v) for k, v in state.items()}
    return {"dense": len(dense), "gzip": len(gzip.compress(dense, compresslevel=6)), "sparse_csr": len(_state_bytes(sparse))}


# --------------------------------------------------------------------------- structured


def channel_multiple(flags: Mapping[str, bool]) -> int:
    """Channel counts a pruned layer should keep a multiple of on this CPU: its fp32 vector width.

    ONNX Runtime's x86 convolutions (and oneDNN's) store activations in channel blocks as wide as a
    vector register: 16 floats with AVX-512, 8 with AVX2. A layer whose channel count is not a
    multiple of the block is padded up to one, so the padded channels cost time and buy nothing.
    Measured on 2 AVX-512 cores (AMD EPYC, 2026-12-06, ONNX Runtime, batch 32, no fine-tune):
    the student with 50% of its channels removed ran in 1.08 ms rounded to 16 against 1.33 ms
    rounded to 8 (dense 2.12 ms), although rounding to 16 keeps more MACs. ``flags`` is a hardware
    report's ``cpu_flags``.
    """
    return 16 if flags.get("avx512f") else 8


def classifier(model: nn.Module) -> nn.Linear:
    """The final Linear layer: its 10 outputs are the classes and must never be pruned."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no Linear classifier")
    return linears[-1]


def macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates for one forward pass of ``example`` (:func:`bench.count_macs`) and the parameter count."""
    return bench.count_macs(model, example), models.count_parameters(model)


# --------------------------------------------------------------------------- save / load a pruned model


def channel_config(model: nn.Module) -> dict[str, dict[str, int]]:
    """The shape of every Conv2d, BatchNorm2d and Linear: all that differs after channel pruning."""
    cfg: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            cfg[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.BatchNorm2d):
            cfg[name] = {"features": m.num_features}
        elif isinstance(m, nn.Linear):
            cfg[name] = {"in": m.in_features, "out": m.out_features}
    return cfg


def apply_channel_config(model: nn.Module, cfg: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Rebuild the layers of a fresh ``models.build()`` model at the shapes in ``cfg`` (in place).

    Only plain ints from a JSON file are used, so loading never unpickles code.
    """
    layers = dict(model.named_modules())
    if set(cfg) - set(layers):
        raise ValueError(f"channel configuration names layers this architecture lacks: {sorted(set(cfg) - set(layers))[:3]}")
    for name, shape in cfg.items():
        old = layers[name]
        if isinstance(old, nn.Conv2d):
            new = nn.Conv2d(shape["in"], shape["out"], old.kernel_size, old.stride, old.padding, old.dilation,
                            shape["groups"], bias=old.bias is not None, padding_mode=old.padding_mode)
        elif isinstance(old, nn.BatchNorm2d):
            new = nn.BatchNorm2d(shape["features"], eps=old.eps, momentum=old.momentum, affine=old.affine)
        elif isinstance(old, nn.Linear):
            new = nn.Linear(shape["in"], shape["out"], bias=old.bias is not None)
        else:
            raise ValueError(f"{name} is a {type(old).__name__}; the configuration expects a Conv2d, BatchNorm2d or Linear")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


PRUNED_FORMAT = "state_dict + channel_config"


def save_pruned(model: nn.Module, folder: Path, name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Save a channel-pruned model as a plain ``state_dict`` plus a JSON file with its channel configuration.

    ``meta`` must name ``arch`` and ``profile``. The JSON also holds the data hash, library
    versions and the sha256 of the weights, which :func:`load_pruned` checks.
    """
    for key in ("arch", "profile"):
        if key not in meta:
            raise ValueError(f"meta must include {key!r}")
    if name in models.ROLES:
        raise ValueError(f"refusing to overwrite the course checkpoint {name!r}: pick a lesson-specific name")
    pt, js = models.checkpoint_paths(folder, name)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return artefacts.save(pt, lambda tmp: torch.save(state, tmp),
                          {"name": name, **meta, "format": PRUNED_FORMAT, "channel_config": channel_config(model)}, js)


def load_pruned(folder: Path, name: str, *, profile: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model saved by :func:`save_pruned` after checking its sha256, profile and data hash."""
    pt, js = models.checkpoint_paths(folder, name)
    meta = models.read_metadata(folder, name)
    fix = "rerun notebooks/02_pruning.ipynb to rebuild it"
    if meta is None or not pt.is_file():
        raise models.CheckpointError(f"no complete pruned model {name!r} in {shown(folder)} (need {pt.name} and {js.name}); {fix}")
    problems = artefacts.problems(pt, meta, profile=profile, kind=PRUNED_FORMAT)
    if "channel_config" not in meta:
        problems.append("its metadata has no channel_config")
    if problems:
        raise models.CheckpointError(f"refusing pruned model {shown(pt)}: " + "; ".join(problems) + f". To fix: {fix}")
    model = apply_channel_config(models.build(meta["arch"]), meta["channel_config"])
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    return model.eval(), meta


# --------------------------------------------------------------------------- fine-tuning


MIN_FINETUNE_STEPS = 5


def finetune_batch_size(images: int, epochs: int) -> int:
    """A batch size (8 to 128) that gives a short fine-tune at least ~8 optimiser steps.

    ``train.fit``'s one-cycle schedule needs several steps: with one step its learning rate is
    ~0 (nothing is learnt), with exactly four PyTorch's ``OneCycleLR`` divides by zero.
    """
    if epochs < 1:
        raise ValueError(f"a fine-tune needs at least one epoch, got {epochs}")
    batch_size = max(8, min(128, images * epochs // 8))
    if epochs * math.ceil(images / batch_size) < MIN_FINETUNE_STEPS:
        raise ValueError(f"{images} images x {epochs} epoch(s) make fewer than {MIN_FINETUNE_STEPS} optimiser steps; "
                         f"fine-tune on at least {8 * MIN_FINETUNE_STEPS} images")
    return batch_size


def finetune_steps(images: int, epochs: int) -> int:
    """Optimiser steps of :func:`finetune` on ``images`` images: what a shared progress bar counts."""
    return epochs * math.ceil(images / finetune_batch_size(images, epochs))


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, augment: bool,
             teacher_logits: torch.Tensor | None = None, bar: Any = None, desc: str = "fine-tune") -> nn.Module:
    """A short fine-tune with the course's training loop, at a lower peak learning rate.

    Pruning masks (``weight_orig * weight_mask``) stay in place, so pruned weights stay zero.
    With ``teacher_logits`` (the teacher's logits for ``x``, e.g. from ``assets.logits("teacher",
    "train")``) the loss is knowledge distillation (:class:`deploylab.distill.DistillationLoss`,
    its default temperature and alpha) instead of label-smoothed cross-entropy. ``bar``: a tqdm
    bar to advance (one bar for several fine-tunes). ``train.fit`` trains in channels-last memory
    format; the model comes back in the default (contiguous) format so that every variant is
    benchmarked alike.
    """
    batch_size = finetune_batch_size(len(x), epochs)
    loss_fn, targets = None, y
    if teacher_logits is not None:
        loss_fn, targets = distill.DistillationLoss(), distill.pack_targets(teacher_logits, y)
    fit(model, x, targets, Recipe(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment),
        loss_fn=loss_fn, desc=desc, bar=bar)
    return model.to(memory_format=torch.contiguous_format).eval()
