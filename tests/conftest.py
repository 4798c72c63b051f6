"""Shared fixtures: tests run in the smoke profile and never touch the real data/ or results/."""

from __future__ import annotations

import pytest

from deploylab import config, data


@pytest.fixture
def tmp_dirs(tmp_path, monkeypatch):
    """Point DATA_DIR, RESULTS_DIR, the shipped models and the resume checkpoints at a temporary folder
    (the real dataset cache stays readable; a real `deploylab prepare` running beside the tests is untouched)."""
    monkeypatch.setattr(config, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(config, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(config, "SHIPPED_DIR", tmp_path / "models")
    monkeypatch.setattr(config, "RESUME_DIR", tmp_path / "resume")
    data.load_fashion_mnist.cache_clear()
    data.tensors.cache_clear()
    yield tmp_path
    data.load_fashion_mnist.cache_clear()
    data.tensors.cache_clear()


@pytest.fixture(scope="session")
def profile():
    """The active profile (``make test`` sets smoke)."""
    return config.get_profile()


@pytest.fixture(scope="session")
def onnx_path(profile):
    """The profile's exported student (built on first use): what every serving test serves."""
    from deploylab import deployable

    return deployable.student_onnx(profile)
