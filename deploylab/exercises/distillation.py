"""Lesson 03's exercise: the teacher's dark knowledge -- its runner-up class for shirts at T = 4."""

from __future__ import annotations

from typing import Any

import torch

from . import Exercise, WrongAnswer

SHIRT = 6
TEMPERATURE = 4.0


def _mean_soft_targets(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax(logits / T) over the images labelled Shirt, in float64."""
    return torch.softmax(teacher_logits[labels == SHIRT].double() / TEMPERATURE, dim=1).mean(0)


def check(answers: dict[str, Any], *, teacher_logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Right when ``runner_up`` is the class other than Shirt with the highest mean soft target."""
    from deploylab.data import CLASS_NAMES

    p = _mean_soft_targets(teacher_logits, labels)
    answer = answers["runner_up"]
    if answer not in range(len(p)):
        raise WrongAnswer(f"runner_up is a class index 0-{len(p) - 1}, got {answer!r}")
    if answer == SHIRT:
        raise WrongAnswer("pick a class other than Shirt (6): the question is which class comes next")
    others = p.clone()
    others[SHIRT] = -1.0
    if p[answer] < others.max():
        raise WrongAnswer("not the class with the highest mean probability after Shirt (average over images, at T=4)")
    return (f"for shirts the teacher's next guess is {CLASS_NAMES[answer]} ({p[answer]:.1%} on average at T=4) "
            "-- knowledge a one-hot label cannot give the student")


def solution(*, teacher_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Average the soft targets over the shirts, then take the largest class other than Shirt."""
    mask = labels == 6
    mean_p = (teacher_logits[mask] / 4).softmax(1).mean(0)
    mean_p[6] = -1  # leave Shirt itself out
    return {"runner_up": int(mean_p.argmax())}


def example_inputs() -> dict[str, Any]:
    """The shipped teacher's logits on 2,000 real training images."""
    from deploylab import assets, data, train

    x, y = data.tensors("train", 2000)
    return {"teacher_logits": train.predict(assets.teacher("workshop", build=False).model, x), "labels": y}


def wrong_answers(answers: dict[str, Any], *, teacher_logits: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    """Shirt itself; the third class (second after Shirt); the class the teacher predicts least."""
    order = [int(k) for k in _mean_soft_targets(teacher_logits, labels).argsort(descending=True) if int(k) != SHIRT]
    return [{"runner_up": SHIRT}, {"runner_up": order[1]}, {"runner_up": order[-1]}]


EXERCISE = Exercise(name="dark_knowledge", lesson="03_distillation", answers=("runner_up",),
                    check=check, solution=solution, example_inputs=example_inputs, wrong_answers=wrong_answers)
