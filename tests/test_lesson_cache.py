"""assets.lesson_model / lesson_result: a lesson's training runs once per settings, then loads."""

from __future__ import annotations

import json

import pytest
import torch

from deploylab import assets, config, models


def _trainer(calls):
    def train_model(model):
        calls.append(1)
        with torch.no_grad():
            model.classifier[-1].bias.fill_(0.5)  # a visible change, so "loaded" can be told from "fresh"
        return {"training_seconds": 1.5, "history": {"loss": [1.0, 0.5]}}
    return train_model


def test_lesson_model_trains_once_then_loads(tmp_dirs):
    calls = []
    settings = {"temperature": 4.0, "alpha": 0.9, "sizes": (1, 2)}
    first, loaded = assets.lesson_model("student_demo", "mobilenet_v2", settings, _trainer(calls), "smoke")
    assert not loaded and calls == [1]
    assert first.meta["training_seconds"] == 1.5 and first.meta["settings"]["sizes"] == [1, 2]
    again, loaded = assets.lesson_model("student_demo", "mobilenet_v2", settings, _trainer(calls), "smoke")
    assert loaded and calls == [1], "same settings must load, not train"
    assert torch.equal(again.model.classifier[-1].bias, torch.full((10,), 0.5))
    assert again.meta["sha256"] == first.meta["sha256"]


def test_lesson_model_retrains_on_other_settings_or_when_asked(tmp_dirs):
    calls = []
    assets.lesson_model("student_demo", "mobilenet_v2", {"alpha": 0.9}, _trainer(calls), "smoke")
    _, loaded = assets.lesson_model("student_demo", "mobilenet_v2", {"alpha": 0.5}, _trainer(calls), "smoke")
    assert not loaded and len(calls) == 2
    _, loaded = assets.lesson_model("student_demo", "mobilenet_v2", {"alpha": 0.5}, _trainer(calls), "smoke", retrain=True)
    assert not loaded and len(calls) == 3
    meta = models.read_metadata(config.artefacts_dir("smoke"), "student_demo")
    assert meta["settings"] == {"alpha": 0.5}


def test_lesson_model_refuses_a_tampered_checkpoint(tmp_dirs):
    calls = []
    asset, _ = assets.lesson_model("student_demo", "mobilenet_v2", {"a": 1}, _trainer(calls), "smoke")
    weights = config.artefacts_dir("smoke") / asset.meta["file"]
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(models.CheckpointError, match="sha256"):
        assets.lesson_model("student_demo", "mobilenet_v2", {"a": 1}, _trainer(calls), "smoke")
    assert len(calls) == 1, "a damaged checkpoint is refused, not silently retrained over"


def test_lesson_result_caches_by_settings(tmp_dirs):
    calls = []

    def compute():
        calls.append(1)
        return {"runs": [{"temperature": 1.0, "val_accuracy": 0.5}], "grid": (1, 2)}

    first, loaded = assets.lesson_result("sweep_demo", {"T": (1.0, 4.0)}, compute, "smoke")
    assert not loaded and first["grid"] == [1, 2]
    second, loaded = assets.lesson_result("sweep_demo", {"T": (1.0, 4.0)}, compute, "smoke")
    assert loaded and second == first and len(calls) == 1
    _, loaded = assets.lesson_result("sweep_demo", {"T": (1.0, 8.0)}, compute, "smoke")
    assert not loaded and len(calls) == 2


def test_lesson_result_recomputes_a_damaged_cache_file(tmp_dirs):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assets.lesson_result("sweep_demo", {"x": 1}, compute, "smoke")
    path = config.artefacts_dir("smoke") / "cache" / "sweep_demo.json"
    path.write_text("{not json")
    result, loaded = assets.lesson_result("sweep_demo", {"x": 1}, compute, "smoke")
    assert not loaded and result == {"value": 2}
    assert json.loads(path.read_text())["result"] == {"value": 2}
