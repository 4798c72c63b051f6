"""quantize.py split by concern (QAT in deploylab.qat, saving in deploylab.quantize_save); lesson 01's choice on validation images."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploylab import data, qat, quantize, quantize_save
from deploylab.exercises import quantization as exercise

PACKAGE = Path(quantize.__file__).parent


@pytest.mark.parametrize("name", ["qat_finetune", "loss_trend"])
def test_qat_names_still_resolve_through_quantize(name):
    assert getattr(quantize, name) is getattr(qat, name)


@pytest.mark.parametrize("name", ["drop_unused_attributes", "program_bytes", "save_program", "load_program"])
def test_save_names_still_resolve_through_quantize(name):
    assert getattr(quantize, name) is getattr(quantize_save, name)


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        quantize.no_such_function  # noqa: B018


@pytest.mark.parametrize("module", ["quantize.py", "qat.py", "quantize_save.py"])
def test_each_module_stays_under_500_lines(module):
    assert len((PACKAGE / module).read_text().splitlines()) <= 500


def test_the_accuracy_budget_is_never_chosen_on_test_images():
    """Lesson 01's exercise chooses float layers: pointed at the test split, its check and its solution refuse."""
    x_test, y_test = data.tensors("test", 64)
    inputs = {"model": None, "calibration": None, "x_val": x_test, "y_val": y_test, "sensitivity": {"a": 0.5},
              "budget_points": 1.0}
    with pytest.raises(data.TestImagesError):
        exercise.check({"float_layers": []}, **inputs)
    with pytest.raises(data.TestImagesError):
        exercise.solution(**inputs)
