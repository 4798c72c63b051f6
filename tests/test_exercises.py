"""Every exercise's self-check refuses wrong answers and accepts its solution; no notebook overwrites an answer."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from deploylab import exercises

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(exercises.MODULES)


_CASES: dict[str, tuple] = {}


def _case(name: str) -> tuple:
    """The exercise, its example inputs and its solution, computed once per exercise in this module:
    some inputs take seconds (an ONNX export, a model's logits on thousands of images)."""
    if name not in _CASES:
        exercise = exercises.get(name)
        inputs = exercise.example_inputs()
        _CASES[name] = (exercise, inputs, exercise.solution(**inputs))
    return _CASES[name]


@pytest.fixture(scope="module", autouse=True)
def _forget_cases():
    yield
    _CASES.clear()


@pytest.fixture(scope="module", params=NAMES)
def exercise_case(request):
    return _case(request.param)


def test_the_solution_passes(exercise_case, capsys):
    exercise, inputs, answers = exercise_case
    assert set(answers) == set(exercise.answers)
    assert exercises.check(exercise.name, answers, **inputs) is True
    assert capsys.readouterr().out.startswith("correct: ")


def test_every_wrong_answer_fails(exercise_case):
    exercise, inputs, answers = exercise_case
    wrong = exercise.wrong_answers(answers, **inputs)
    assert wrong, f"{exercise.name} has no wrong answers to test its check with"
    for bad in wrong:
        assert bad != answers, f"{exercise.name}: a 'wrong' answer equals the solution: {bad}"
        with pytest.raises(exercises.WrongAnswer):
            exercises.check(exercise.name, bad, **inputs)


def test_no_answer_yet_is_reported_not_raised(exercise_case, capsys):
    exercise, inputs, _ = exercise_case
    assert exercises.check(exercise.name, {k: None for k in exercise.answers}, **inputs) is False
    assert "not answered yet" in capsys.readouterr().out


@pytest.mark.parametrize("name", [n for n in NAMES if len(exercises.get(n).answers) > 1])
def test_a_partial_answer_is_wrong(name):
    exercise, inputs, answers = _case(name)
    with pytest.raises(exercises.WrongAnswer, match="set"):
        exercises.check(name, {**answers, exercise.answers[-1]: None}, **inputs)


def test_unknown_exercise_and_missing_answers_are_clear_errors():
    with pytest.raises(KeyError, match="known"):
        exercises.get("no such exercise")
    with pytest.raises(TypeError, match="missing"):
        exercises.check("semi_supervised_loss", {}, student_logits=None, teacher_logits=None, labels=None, has_label=None)


def test_show_solution_prints_code_without_running_it(capsys):
    exercises.show_solution("semi_supervised_loss")
    assert "def solution" in capsys.readouterr().out


def _code_cells(notebook: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]


def _assigned_names(source: str) -> set[str]:
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    return {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
            for t in ([node.target] if not isinstance(node, ast.Assign) else node.targets) if isinstance(t, ast.Name)}


@pytest.mark.parametrize("name", NAMES)
def test_the_notebook_checks_the_answer_and_never_sets_it(name):
    """One cell sets the answers to None (the learner's cell); one calls the check; none computes the solution."""
    exercise = exercises.get(name)
    cells = _code_cells(NOTEBOOKS / f"{exercise.lesson}.ipynb")
    checks = [c for c in cells if f'exercises.check("{name}"' in c]
    assert len(checks) == 1, f"{exercise.lesson} must have one self-check cell calling exercises.check({name!r}, ...)"
    setters = [c for c in cells if _assigned_names(c) & set(exercise.answers)]
    assert len(setters) == 1, f"{exercise.lesson}: the answers {exercise.answers} may be assigned in the answer cell only"
    answer_cell = ast.parse(setters[0])
    values = [n.value for n in ast.walk(answer_cell) if isinstance(n, ast.Assign)]
    assert all(isinstance(v, ast.Constant) and v.value is None for v in values), \
        f"{exercise.lesson}: the answer cell must leave the answers as None for the learner"
    assert cells.index(setters[0]) < cells.index(checks[0])
