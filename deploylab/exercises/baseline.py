"""Lesson 00's exercise: which class does the student get wrong most often, and what does it say instead?"""

from __future__ import annotations

from typing import Any

import torch

from . import Exercise, WrongAnswer


def _confusion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """10x10 counts: rows are true classes, columns predicted ones."""
    return torch.bincount(labels * 10 + logits.argmax(1), minlength=100).reshape(10, 10)


def check(answers: dict[str, Any], *, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Right when ``worst_class`` has the highest error rate and ``confused_with`` is its most frequent wrong prediction."""
    from deploylab.data import CLASS_NAMES

    confusion = _confusion(logits, labels).double()
    errors = confusion.clone().fill_diagonal_(0)
    rate = errors.sum(1) / confusion.sum(1)
    worst, confused = answers["worst_class"], answers["confused_with"]
    if worst not in range(10) or rate[worst] < rate.max():
        raise WrongAnswer("worst_class is not the class with the highest error rate "
                          "(errors of a class / images of that class; a row of the confusion matrix)")
    if confused not in range(10) or confused == worst or errors[worst, confused] < errors[worst].max():
        raise WrongAnswer("confused_with is not the class the student predicts most often for worst_class's images "
                          "(the largest off-diagonal entry of that row)")
    return (f"the student misses {CLASS_NAMES[worst]} most often ({rate[worst]:.1%} wrong), "
            f"usually calling it {CLASS_NAMES[confused]}")


def solution(*, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """A confusion matrix, its diagonal removed; the worst row by error rate, then its largest entry."""
    confusion = torch.bincount(labels * 10 + logits.argmax(1), minlength=100).reshape(10, 10)  # rows: true, columns: predicted
    errors = confusion.clone()
    errors.fill_diagonal_(0)
    worst_class = int((errors.sum(1) / confusion.sum(1)).argmax())
    confused_with = int(errors[worst_class].argmax())
    return {"worst_class": worst_class, "confused_with": confused_with}


def example_inputs() -> dict[str, Any]:
    """The shipped student's logits on 1,000 real test images."""
    from deploylab import assets, data, train

    x, y = data.tensors("test", 1000)
    return {"logits": train.predict(assets.student("workshop", build=False).model, x), "labels": y}


def wrong_answers(answers: dict[str, Any], *, logits: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    """The second-worst class; the right class with its second most frequent confusion."""
    confusion = _confusion(logits, labels).double()
    errors = confusion.clone().fill_diagonal_(0)
    rate = errors.sum(1) / confusion.sum(1)
    worst = answers["worst_class"]
    second_worst = int(rate.argsort(descending=True)[1])
    second_confused = int(errors[worst].argsort(descending=True)[1])
    return [{"worst_class": second_worst, "confused_with": answers["confused_with"]},
            {"worst_class": worst, "confused_with": second_confused},
            {"worst_class": worst, "confused_with": worst}]


EXERCISE = Exercise(name="worst_class", lesson="00_baseline", answers=("worst_class", "confused_with"),
                    check=check, solution=solution, example_inputs=example_inputs, wrong_answers=wrong_answers)
