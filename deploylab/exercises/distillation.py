"""Lesson 03's exercise: write the few-label distillation loss as a function, checked on real logits.

The learner writes ``loss_fn(student_logits, teacher_logits, labels, has_label, T, alpha)``: the
teacher's soft targets teach on *every* image (KL(teacher || student) of the distributions at
temperature ``T``, averaged over the images, scaled by ``T**2``), the cross-entropy with the labels
only on the images whose label may be used (``has_label``; no labelled image: no hard term), mixed
as ``alpha * soft + (1 - alpha) * hard``. It must return a 0-d tensor that gradients flow through.

The check compares it with :func:`reference_loss` on the shipped student's and teacher's logits of
real training images, at several ``T`` and ``alpha``, and names the near miss when it recognises one:
no ``T**2``, the KL the wrong way round, the teacher not softened, the hard term over unlabelled
images or averaged over all images, ``alpha`` on the wrong term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import Exercise, WrongAnswer

NAME = "semi_supervised_loss"
SETTINGS = ((4.0, 0.9), (2.0, 0.5), (1.0, 0.7), (8.0, 1.0), (4.0, 0.0))  # (T, alpha) pairs the check tries
RTOL = 1e-4


def _terms(s, t, y, has, T, *, kl="forward", soften_teacher=True, square=True, hard="labelled"):
    """The soft and hard terms, with the variants of the near misses."""
    log_ps = F.log_softmax(s / T, dim=1)
    log_pt = F.log_softmax(t / (T if soften_teacher else 1.0), dim=1)
    if kl == "forward":  # KL(teacher || student)
        soft = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    else:  # KL(student || teacher)
        soft = F.kl_div(log_pt, log_ps, reduction="batchmean", log_target=True)
    soft = soft * (T**2 if square else 1.0)
    if hard == "labelled":
        hard_term = F.cross_entropy(s[has], y[has]) if has.any() else s.sum() * 0.0
    elif hard == "all":  # uses labels it may not use
        hard_term = F.cross_entropy(s, y)
    else:  # "over all": the labelled images' losses summed, divided by every image
        hard_term = F.cross_entropy(s[has], y[has], reduction="sum") / len(y)
    return soft, hard_term


def reference_loss(student_logits, teacher_logits, labels, has_label, T, alpha, **variant) -> torch.Tensor:
    """The loss the exercise asks for (``variant`` builds the near misses)."""
    swap = variant.pop("swap_alpha", False)
    soft, hard = _terms(student_logits, teacher_logits, labels, has_label, T, **variant)
    return (1 - alpha) * soft + alpha * hard if swap else alpha * soft + (1 - alpha) * hard


NEAR_MISSES = {
    "the KL divergence is not scaled by T**2 (the soft term's gradients shrink like 1/T**2 without it)": {"square": False},
    "the KL divergence goes the wrong way: F.kl_div(input, target) computes KL(target || input), so input is the "
    "student's log-probabilities and target the teacher's": {"kl": "reverse"},
    "the teacher's logits are not divided by T: both distributions are softened": {"soften_teacher": False},
    "the hard term uses the labels of every image: only the images where has_label is True may use theirs": {"hard": "all"},
    "the hard term is divided by every image, labelled or not: average the cross-entropy over the labelled images": {"hard": "mean_all"},
    "alpha weighs the teacher's term, 1 - alpha the labels: they are swapped": {"swap_alpha": True},
}


def _batches(student_logits, teacher_logits, labels, has_label):
    """The whole set, and a batch with no labelled image (the hard term must vanish, not become NaN)."""
    yield student_logits, teacher_logits, labels, has_label
    idx = (~has_label).nonzero().flatten()[:64]
    yield student_logits[idx], teacher_logits[idx], labels[idx], has_label[idx]


def check(answers: dict[str, Any], *, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
          has_label: torch.Tensor) -> str:
    """Right when ``loss_fn`` matches :func:`reference_loss` at every setting, and gradients reach the student's logits."""
    fn = answers["loss_fn"]
    if not callable(fn):
        raise WrongAnswer(f"loss_fn is a function (student_logits, teacher_logits, labels, has_label, T, alpha) -> loss, got {fn!r}")
    if not has_label.any() or has_label.all():
        raise ValueError("has_label must mark some images and leave others unlabelled")
    for T, alpha in SETTINGS:
        for s, t, y, has in _batches(student_logits.float(), teacher_logits.float(), labels, has_label):
            s = s.detach().clone().requires_grad_(True)
            try:
                got = fn(s, t, y, has, T, alpha)
            except Exception as e:  # noqa: BLE001 -- the learner's code: say what failed, as a wrong answer
                raise WrongAnswer(f"loss_fn raised {type(e).__name__}: {e} (at T={T}, alpha={alpha}, "
                                  f"{int(has.sum())} labelled of {len(y)} images)") from None
            if not isinstance(got, torch.Tensor) or got.ndim != 0:
                raise WrongAnswer(f"loss_fn must return a 0-d tensor (one number for the batch), got {type(got).__name__}"
                                  + (f" of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else ""))
            if not got.requires_grad:
                raise WrongAnswer("no gradient flows from the loss to the student's logits (.item(), .detach() or a NumPy "
                                  "detour breaks training): compute it with torch operations")
            want = reference_loss(s, t, y, has, T, alpha)
            if not torch.isfinite(got) or not torch.allclose(got.detach(), want.detach(), rtol=RTOL, atol=1e-6):
                where = f"at T={T}, alpha={alpha}" + (" on a batch with no labelled image" if not has.any() else "")
                for hint, variant in NEAR_MISSES.items():
                    other = reference_loss(s, t, y, has, T, alpha, **variant).detach()
                    if not torch.allclose(other, want.detach(), rtol=RTOL, atol=1e-6) and \
                            torch.allclose(got.detach(), other, rtol=RTOL, atol=1e-6):
                        raise WrongAnswer(f"{where}: {hint}")
                raise WrongAnswer(f"{where} loss_fn gives {got.item():.5f}, expected {want.item():.5f} "
                                  "(soft term: KL(teacher || student) at T, batch mean, times T**2; hard term: "
                                  "cross-entropy over the labelled images only)")
    n_lab = int(has_label.sum())
    T, alpha = SETTINGS[0]
    soft, hard = _terms(student_logits.float(), teacher_logits.float(), labels, has_label, T)
    return (f"your loss matches the reference at {len(SETTINGS)} settings of T and alpha on {len(labels):,} real images "
            f"({n_lab:,} labelled); at T={T:g}, alpha={alpha:g} the soft term is {soft.item():.3f} and the hard term "
            f"{hard.item():.3f} -- the teacher teaches on all {len(labels):,} images, the labels on {n_lab:,}")


def solution(*, student_logits, teacher_logits, labels, has_label) -> dict[str, Callable]:
    """The soft term on every image, the hard term on the labelled ones."""

    def loss_fn(student_logits, teacher_logits, labels, has_label, T, alpha):
        soft = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                        reduction="batchmean", log_target=True) * T**2  # KL(teacher || student), every image
        if has_label.any():
            hard = F.cross_entropy(student_logits[has_label], labels[has_label])  # labelled images only
        else:
            hard = student_logits.sum() * 0.0  # no label in this batch: no hard term
        return alpha * soft + (1 - alpha) * hard

    return {"loss_fn": loss_fn}


def example_inputs() -> dict[str, Any]:
    """The shipped student's and teacher's logits on 2,000 real training images, 20 labels per class kept."""
    from deploylab import assets, data, distill, train

    x, y = data.tensors("train", 2000)
    return {"student_logits": train.predict(assets.student("workshop", build=False).model, x),
            "teacher_logits": train.predict(assets.teacher("workshop", build=False).model, x),
            "labels": y, "has_label": distill.labels_per_class(y, 20, seed=0)}


def wrong_answers(answers: dict[str, Any], **inputs: Any) -> list[dict[str, Any]]:
    """Each near miss of :data:`NEAR_MISSES` as a function, and one that returns a float (no gradient)."""
    def as_fn(variant):
        return {"loss_fn": lambda s, t, y, has, T, alpha: reference_loss(s, t, y, has, T, alpha, **dict(variant))}

    wrong = [as_fn(v) for v in NEAR_MISSES.values()]
    wrong.append({"loss_fn": lambda s, t, y, has, T, alpha: reference_loss(s, t, y, has, T, alpha).item()})
    return wrong


EXERCISE = Exercise(name=NAME, lesson="03_distillation", answers=("loss_fn",),
                    check=check, solution=solution, example_inputs=example_inputs, wrong_answers=wrong_answers)
