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


@pytest.fixture(scope="session")
def program_path(profile):
    """The profile's ExecuTorch INT8 student (``serve_student_int8.pte``, built on first use): lesson 04b's choice, served."""
    from deploylab import deployable

    return deployable.student_program(profile)


@pytest.fixture(scope="session")
def serve_image(profile, onnx_path):
    """Lesson 06's serving image (``deploylab-serve:<profile>``), staged and built once per session for the
    tests that run it (test_docker_integration, test_proxy_integration): a second build would only stage the
    archive again and send the build context for the cached layers. Only requested where Docker runs."""
    import os
    from pathlib import Path

    from deploylab.serving import docker_build, engine

    wheels = os.environ.get("DEPLOYLAB_WHEELS") or ("/opt/wheels" if any(Path("/opt/wheels").glob("torch-*.whl")) else None)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    certs = os.environ.get("DEPLOYLAB_CERTS") or (str(bundle) if bundle.is_file() else None)
    engine.ensure_base_image()
    docker_build.stage_context(onnx_path, wheels=wheels, certs=certs)
    return docker_build.build_image(f"{docker_build.IMAGE}:{profile.name}", progress=False)
