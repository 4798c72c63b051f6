"""Knowledge distillation: a ResNet50 teacher's soft predictions teach a MobileNetV2 student.

The loss (Hinton, Vinyals and Dean, 2015) mixes two terms:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * CE(student, labels)

The temperature ``T`` softens both distributions so that the teacher's "dark knowledge" -- which
wrong classes it finds plausible (a shirt looks more like a T-shirt than a sandal) -- carries
signal; ``T^2`` keeps the soft term's gradients on the same scale whatever ``T`` is.

Lesson 03 trains its students with a plain loop written out in the notebook (the technique, to
copy), from teacher logits cached once for both views of each image (``assets.logits(...,
view=...)``). For code that trains with :func:`deploylab.train.fit` instead (lesson 02's
fine-tune with a teacher), :func:`pack_targets` concatenates the teacher's logits and the labels
into one float tensor ``(N, classes + 1)`` that ``fit`` shuffles and batches exactly like labels,
and :class:`DistillationLoss` unpacks them: no index bookkeeping, no teacher forward pass per step.

Profile sizes of the lesson (epochs, sweep grid, seeds) are in :data:`SIZES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Profile


@dataclass(frozen=True)
class DistillSizes:
    """How much the distillation lesson trains in one profile.

    Every student of the lesson is trained by the notebook's own loop for ``epochs`` epochs over
    the profile's training images (the scratch students of the few-label setting: as many
    optimiser steps on their labelled images, :func:`matched_epochs`), with horizontal flips --
    the two views whose teacher logits are cached.
    """

    labels_per_class: tuple[int, ...]  # the few-label settings (smallest first): labelled images per class
    epochs: int  # epochs over all training images of each distilled student (and the all-label pair)
    seeds: tuple[int, ...]  # seeds of the few-label comparison (labelled subset and initialisation)
    sweep_temperatures: tuple[float, ...]
    sweep_alphas: tuple[float, ...]
    sweep_train_images: int  # training images of each sweep run (the smallest label count among them)
    sweep_epochs: int
    sweep_val_images: int | None  # validation images scoring each sweep run (never test images; None: all 5,000)


# Throughput measured on 2 AVX2 cores (AMD EPYC): the student trains at roughly 250-300 images/s in
# the lesson's loop and the teacher predicts ~80-150 images/s (its logits: two views of each
# training image, computed once and cached).
SIZES: dict[str, DistillSizes] = {
    # CI: every step on a handful of images (the smoke models are near chance anyway)
    "smoke": DistillSizes(labels_per_class=(5, 20), epochs=2, seeds=(0, 1),
                          sweep_temperatures=(1.0, 4.0), sweep_alphas=(0.9,), sweep_train_images=512,
                          sweep_epochs=2, sweep_val_images=256),  # the one-cycle schedule needs >= 5 steps
    # 12,000 training images: ~140k student images (sweep 4 x 18k, few labels 4 x 12k, all labels 2 x 12k)
    # and 24,000 teacher images: about 10 minutes the first time on 2 AVX2 cores, then loaded
    "workshop": DistillSizes(labels_per_class=(100,), epochs=1, seeds=(0, 1),
                             sweep_temperatures=(1.0, 4.0, 8.0), sweep_alphas=(0.9,), sweep_train_images=6000,
                             sweep_epochs=3, sweep_val_images=2000),
    # 55,000 training images: ~0.7 M student images (sweep 9 x 30k, few labels 6 x 55k, all labels
    # 2 x 55k) and 110,000 teacher images: about 1 h 10 min the first time on 2 AVX2 cores (a GPU: minutes)
    "full": DistillSizes(labels_per_class=(100,), epochs=1, seeds=(0, 1, 2),
                         sweep_temperatures=(1.0, 2.0, 4.0, 8.0), sweep_alphas=(0.5, 0.9), sweep_train_images=10_000,
                         sweep_epochs=3, sweep_val_images=None),
}


def sizes(profile: Profile) -> DistillSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


def _check_hyperparameters(temperature: float, alpha: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (typical: 1 to 8), got {temperature}")
    if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha weighs the soft (teacher) term against the hard-label term and must be in [0, 1], got {alpha}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0) -> torch.Tensor:
    """The knowledge-distillation loss, averaged over the batch (see the module docstring).

    ``student_logits`` and ``teacher_logits`` are ``(N, C)``; ``labels`` are ``(N,)`` class indices.
    Computed in fp32 whatever the logits' dtype (under bf16 autocast the student's are bf16).
    """
    _check_hyperparameters(temperature, alpha)
    if student_logits.ndim != 2:
        raise ValueError(f"student logits must be (batch, classes), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same shape")
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels must be ({student_logits.shape[0]},) class indices, got shape {tuple(labels.shape)}")
    s, t, T = student_logits.float(), teacher_logits.detach().float(), float(temperature)
    soft = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True)
    hard = F.cross_entropy(s, labels.long(), label_smoothing=label_smoothing)
    return alpha * T * T * soft + (1.0 - alpha) * hard


def pack_targets(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One float tensor ``(N, C + 1)``: the teacher's logits, then the label, per image.

    ``train.fit`` batches and shuffles ``targets`` row by row like labels, so each batch carries
    the teacher logits of exactly its images. Labels up to 2^24 are exact in float32.
    """
    if teacher_logits.ndim != 2 or labels.ndim != 1 or len(teacher_logits) != len(labels):
        raise ValueError(f"need teacher logits (N, C) and labels (N,) for the same N, got "
                         f"{tuple(teacher_logits.shape)} and {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    return torch.cat([teacher_logits.float(), labels.float().unsqueeze(1)], dim=1)


def unpack_targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_targets`: ``(teacher_logits (N, C), labels (N,) int64)``."""
    if targets.ndim != 2 or targets.shape[1] < 3:
        raise ValueError(f"packed targets must be (N, classes + 1) from pack_targets, got shape {tuple(targets.shape)}")
    return targets[:, :-1], targets[:, -1].round().long()


def with_mirrored_view(x: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                       teacher_logits_hflip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image twice, as it is and mirrored, each with the teacher's logits *of that view*.

    Cached teacher logits hold for the exact pixels they were computed on: a randomly cropped or
    flipped image gets soft targets that describe another image. Training on both cached views
    (``assets.logits(..., view="original")`` and ``view="hflip"``) without random augmentation
    keeps the flip augmentation and keeps every soft target true. Returns ``(images, labels,
    teacher_logits)``, each twice as long as its input: the originals first, then the mirrors.
    """
    n = len(x)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    for name, t in (("labels", labels), ("teacher_logits", teacher_logits), ("teacher_logits_hflip", teacher_logits_hflip)):
        if len(t) != n:
            raise ValueError(f"{name} has {len(t)} rows for {n} images: they must be the same images, in the same order")
    if teacher_logits.shape != teacher_logits_hflip.shape:
        raise ValueError(f"the two views' logits differ in shape: {tuple(teacher_logits.shape)} "
                         f"and {tuple(teacher_logits_hflip.shape)}")
    return torch.cat([x, x.flip(3)]), torch.cat([labels, labels]), torch.cat([teacher_logits, teacher_logits_hflip])


class DistillationLoss:
    """``loss_fn(logits, packed_targets)`` for :func:`deploylab.train.fit`.

    Also keeps running training statistics (accuracy against the labels, agreement with the
    teacher, the two loss terms) per epoch, since ``fit``'s progress bar shows only the loss.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0):
        _check_hyperparameters(temperature, alpha)
        self.temperature, self.alpha, self.label_smoothing = float(temperature), float(alpha), label_smoothing
        self.stats: dict[str, float] = {"images": 0, "correct": 0, "agree": 0}

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        teacher_logits, labels = unpack_targets(targets)
        with torch.no_grad():
            pred = logits.argmax(1)
            self.stats["images"] += len(labels)
            self.stats["correct"] += (pred == labels).sum().item()
            self.stats["agree"] += (pred == teacher_logits.argmax(1)).sum().item()
        return kd_loss(logits, teacher_logits, labels, temperature=self.temperature, alpha=self.alpha,
                       label_smoothing=self.label_smoothing)

    def summary(self) -> dict[str, float]:
        """Training accuracy and teacher agreement over everything seen so far (augmented batches)."""
        n = max(self.stats["images"], 1)
        return {"train_accuracy": self.stats["correct"] / n, "teacher_agreement": self.stats["agree"] / n}

    def __repr__(self) -> str:
        return f"DistillationLoss(temperature={self.temperature}, alpha={self.alpha})"


def label_subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask of the ``round(fraction * n)`` images (at least one) that keep their label."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if n < 1:
        raise ValueError(f"need at least one image, got n={n}")
    k = max(1, round(fraction * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] = True
    return mask


def labels_per_class(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Boolean mask keeping the label of ``per_class`` random images of every class (the few-label setting).

    Drawn per class, so that every class has exactly ``per_class`` labels (a plain random subset
    of 1,000 images would give some classes 80 and others 120).
    """
    if per_class < 1:
        raise ValueError(f"need at least one label per class, got {per_class}")
    if labels.ndim != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be (N,) integer class indices, got {labels.dtype} of shape {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than the {per_class} labels asked for")
        mask[members[torch.randperm(len(members), generator=gen)[:per_class]]] = True
    return mask


def teacher_labels(labels: torch.Tensor, teacher_logits: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """Labels where ``labeled`` is True, the teacher's prediction (argmax) everywhere else."""
    if not (len(labels) == len(teacher_logits) == len(labeled)) or labeled.dtype != torch.bool:
        raise ValueError("labels, teacher logits and a boolean mask of the same length are needed")
    return torch.where(labeled, labels, teacher_logits.argmax(1))


def matched_epochs(epochs: int, n_all: int, n_labeled: int, batch_size: int = 128) -> int:
    """Epochs over ``n_labeled`` images that take about as many optimiser steps as ``epochs`` over ``n_all``.

    The scratch student of the few-label setting sees only the labelled images; giving it the same
    number of steps as the distilled student (which sees all images) keeps the comparison about
    the teacher's knowledge, not about training longer.
    """
    if epochs < 1 or n_labeled < 1 or n_all < n_labeled:
        raise ValueError(f"need epochs >= 1 and 1 <= n_labeled <= n_all, got {epochs}, {n_labeled}, {n_all}")
    steps = epochs * math.ceil(n_all / batch_size)
    return max(epochs, round(steps / math.ceil(n_labeled / batch_size)))


def gain_summary(gains: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of per-seed gains (accuracy points)."""
    if len(gains) < 1:
        raise ValueError("no gains to summarise")
    g = torch.tensor(gains, dtype=torch.float64)
    std = g.std().item() if len(gains) > 1 else float("nan")
    return {"mean": g.mean().item(), "std": std, "min": g.min().item(), "max": g.max().item(), "n": len(gains)}


def plot_sweep(rows: list[dict], baseline: float | None = None, title: str = ""):
    """Validation accuracy (%) against temperature, one line per alpha (``rows``: temperature, alpha, val_accuracy)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for alpha in sorted({r["alpha"] for r in rows}):
        pts = sorted((r["temperature"], 100 * r["val_accuracy"]) for r in rows if r["alpha"] == alpha)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"alpha = {alpha}")
    if baseline is not None:
        ax.axhline(100 * baseline, color="gray", linestyle="--", label="hard labels only (alpha = 0)")
    ax.set_xscale("log", base=2)
    temps = sorted({r["temperature"] for r in rows})
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.minorticks_off()
    ax.set_xlabel("temperature T (log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
