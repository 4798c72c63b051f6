"""Lesson 04b's runtimes: ExecuTorch delegation, the AOTInductor package in a fresh process, the measured choice.

The runtime tests use the smoke student (the real MobileNetV2 architecture, trained briefly on real
Fashion-MNIST images) and real test images.
"""

from __future__ import annotations

import pytest
import torch

from deploylab import assets, bench, config, data
from deploylab.backends import choice, harness

pytest.importorskip("executorch", reason="lesson 04b's runtimes are missing: run `make setup` (the lock pins executorch)")


@pytest.fixture(scope="module")
def student():
    return assets.student("smoke").model.eval()


@pytest.fixture(scope="module")
def images():
    return data.tensors("test", 32)[0]


@pytest.fixture(scope="module")
def program(student, images):
    batch = torch.export.Dim("batch", min=1, max=32)
    # the example is the largest batch: ExecuTorch plans memory from it (exported from a batch of 2, a batch of 32 was refused)
    return torch.export.export(student, (images,), dynamic_shapes=({0: batch},))


def test_xnnpack_takes_every_convolution_and_linear_layer(program, student, images, tmp_path):
    from deploylab.backends import executorch_xnnpack as et

    edge = et.lower(program)
    rows = et.delegation(edge)
    assert et.undelegated_compute(rows) == [], rows
    assert sum(r["delegated"] for r in rows) > 0
    path = et.save(edge, tmp_path / "student.pte")
    et.set_threads(2)
    run = et.runner(path)
    with torch.inference_mode():
        expected = student(images)
    for b in (1, 32):  # one program, both batch sizes (dynamic batch up to 32)
        assert torch.allclose(run(images[:b]), expected[:b], atol=1e-3)


def test_the_delegation_check_catches_portable_fallbacks(student, images):
    """Lowered with no partitioner, the student's first block (conv, batch norm, ReLU6) stays on portable kernels."""
    from executorch.exir import to_edge_transform_and_lower

    from deploylab.backends import executorch_xnnpack as et

    block = student.features[0]
    left = et.undelegated_compute(et.delegation(to_edge_transform_and_lower(torch.export.export(block, (images,)))))
    assert any("convolution" in op for op in left), left


def test_aotinductor_package_answers_in_a_fresh_process(student, images, tmp_path):
    """The .pt2 loads where the model's class was never imported and matches eager PyTorch.

    The student's first blocks (torchvision's MobileNetV2 classes, convolutions, batch norms, ReLU6):
    the load is what is tested here; the whole student's package is built and loaded the same way by
    lesson 04b's smoke run, which ``make test`` also executes (compiling it twice cost ~25 s).
    """
    from deploylab.backends import inductor

    student = student.features[:4]
    static = torch.export.export(student, (images,))  # the lesson's packages are static: one per batch size
    path, seconds = inductor.package(static, tmp_path / "student.pt2")
    assert path.is_file() and seconds > 0 and not list(tmp_path.glob(".*partial*"))
    out = tmp_path / "logits.npy"
    run = harness.cold_start("aotinductor", path, images, threads=2, logits_out=out)
    import numpy as np

    fresh = torch.from_numpy(np.load(out))
    with torch.inference_mode():
        expected = student(images)
    assert torch.allclose(fresh, expected, atol=1e-3), (fresh - expected).abs().max()
    assert run["load_s"] > 0 and run["peak_rss_mb"] > 0


def test_onnx_runtime_cold_start_never_imports_torch(images):
    from deploylab import deployable

    path = deployable.student_onnx(config.PROFILES["smoke"])  # the smoke student's ONNX file (exported once, then reused)
    run = harness.cold_start("onnxruntime", path, images[:1], threads=1)
    assert run["torch_imported"] is False and run["first_s"] > 0


def test_paired_score_on_real_predictions(student, images):
    labels = data.tensors("test", 32)[1]
    with torch.inference_mode():
        logits = student(images)
    same = choice.score(logits, labels, logits, resamples=200)
    assert same.agreement == 1.0 and same.delta_interval == (0.0, 0.0)
    flipped = logits.roll(1, dims=1)  # every prediction moved to another class
    worse = choice.score(flipped, labels, logits, resamples=200)
    assert worse.agreement == 0.0 and worse.delta_interval[1] <= 0
    lo, hi = choice.wilson(int((logits.argmax(1) == labels).sum()), len(labels))
    assert lo <= same.accuracy <= hi


def _timing(b: int, medians: list[float]) -> harness.Timing:
    return harness.Timing(b, bench.latency_percentiles(medians, b), tuple(medians))


def test_choice_is_met_only_when_every_round_clears_the_target():
    base = {1: _timing(1, [1.0, 1.0, 1.0]), 32: _timing(32, [10.0, 10.0, 10.0])}
    fast = {1: _timing(1, [0.5, 0.5, 0.5]), 32: _timing(32, [4.0, 4.0, 6.0])}  # 2.5x median, one round 1.67x
    sc = {"base": choice.Score(100, 0.9, (0.8, 0.95), 1.0, 0.0, (0.0, 0.0)),
          "fast": choice.Score(100, 0.9, (0.8, 0.95), 0.99, -0.2, (-0.8, 0.4)),
          "wrong": choice.Score(100, 0.8, (0.7, 0.9), 0.85, -10.0, (-13.0, -7.0))}
    timings = {"base": base, "fast": fast, "wrong": {1: _timing(1, [0.1] * 3), 32: _timing(32, [0.1] * 3)}}
    ch = choice.choose(sc, timings, {"base": "fp32", "fast": "int8", "wrong": "int8"}, baseline="base",
                       flops_per_image=1e6, gflops=100)
    assert ch.chosen == "fast" and "wrong" not in ch.eligible
    by_name = {t["name"].split(", ")[-1]: t for t in ch.targets}
    assert by_name["batch 1 p50"]["met"] and not by_name["batch 32 p50"]["met"]
    assert "slowest round" in by_name["batch 32 p50"]["reason"]
    assert ch.best_fp32 == "base" and not ch.met  # floor: 0.32 ms of 10 ms is 3%


def test_sizes_cover_every_profile():
    assert set(harness.SIZES) == set(config.PROFILES)
    assert harness.sizes(config.PROFILES["workshop"]).test_images is None  # all 10,000 test images
