"""Self-checked exercises: the learner's answer is checked, never overwritten.

Each lesson's exercise lives in a module of this package (``baseline``, ``quantization``,
``pruning``, ``distillation``, ``onnx_export``, ``runtimes``, ``serving``, ``container``, ``decision``,
``scale_out``, ``rollout``, ``monitoring``) as one :class:`Exercise`: a ``check`` that raises :class:`WrongAnswer` with a hint
when an answer is wrong, and a ``solution`` that computes the right answer from the same inputs.
A notebook's self-check cell calls :func:`check`; the solution is printed on demand by
:func:`show_solution`, so "run all" never replaces what the learner wrote.
``tests/test_exercises.py`` runs every check against its solution (must pass) and against wrong
answers (must fail), on small real inputs that each exercise builds itself.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# exercise name -> the module of this package that defines it
MODULES = {"interleaved_timing": "baseline", "accuracy_budget": "quantization", "prune_to_mac_budget": "pruning",
           "semi_supervised_loss": "distillation", "portable_graph": "onnx_export", "jpeg_disagreements": "serving",
           "docker_run_args": "container", "cheap_and_good": "decision", "replicas_for_target": "scale_out",
           "answers_before_rollback": "rollout",
           "budget_burn": "monitoring",
           "runtime_floor": "runtimes"}


class WrongAnswer(AssertionError):
    """An answer that is set but wrong; the message says what to look at."""


@dataclass(frozen=True)
class Exercise:
    """One exercise: the names the learner sets, how they are checked and solved.

    ``check(answers, **inputs)`` returns the sentence printed when the answer is right and raises
    :class:`WrongAnswer` otherwise; ``solution(**inputs)`` returns the right ``answers``.
    ``example_inputs()`` builds small real inputs for the test, and ``wrong_answers(answers,
    **inputs)`` a plausible wrong answer (a near miss, not None) that ``check`` must refuse.
    """

    name: str
    lesson: str  # notebook stem, e.g. "03_distillation"
    answers: tuple[str, ...]
    check: Callable[..., str]
    solution: Callable[..., dict[str, Any]]
    example_inputs: Callable[[], dict[str, Any]]
    wrong_answers: Callable[..., list[dict[str, Any]]]


def as_number(value: Any) -> Any:
    """A 0-d tensor or NumPy scalar as a plain Python number (answers computed with torch or NumPy); others unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def registry() -> dict[str, Exercise]:
    """Every exercise of the course by name (each lesson module defines ``EXERCISE``)."""
    return {name: get(name) for name in MODULES}


def get(name: str) -> Exercise:
    """The exercise called ``name``; a clear error lists the known ones."""
    if name not in MODULES:
        raise KeyError(f"no exercise {name!r}; known: {', '.join(sorted(MODULES))}")
    exercise = importlib.import_module(f"{__name__}.{MODULES[name]}").EXERCISE
    if exercise.name != name:
        raise RuntimeError(f"deploylab.exercises.{MODULES[name]} defines {exercise.name!r}, registered as {name!r}")
    return exercise


def check(name: str, answers: dict[str, Any], **inputs: Any) -> bool:
    """The self-check cell: True and a sentence when right; raises :class:`WrongAnswer` when wrong.

    When no answer is set yet (every answer still None) it says so and returns False instead of
    raising, so that running all cells of a fresh notebook completes.
    """
    exercise = get(name)
    missing = sorted(set(exercise.answers) - set(answers))
    if missing:
        raise TypeError(f"exercise {name!r} checks {', '.join(exercise.answers)}; missing {', '.join(missing)}")
    if all(answers[k] is None for k in exercise.answers):
        print(f"not answered yet: set {', '.join(exercise.answers)} in the cell above and run this cell again "
              f"(stuck? exercises.show_solution({name!r}) prints a solution)")
        return False
    unset = [k for k in exercise.answers if answers[k] is None]
    if unset:
        raise WrongAnswer(f"set {', '.join(unset)} too")
    print("correct: " + exercise.check(answers, **inputs))
    return True


def show_solution(name: str) -> None:
    """Print the source of the exercise's solution (it does not run, so your answer stays)."""
    print(inspect.getsource(get(name).solution))
