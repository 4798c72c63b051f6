"""The model the serving lessons deploy, and the runtime that serves it, as lesson 04b chose.

Two artefacts, each with a verified model card next to it:

- :func:`student_onnx` -- the student's ONNX file (ONNX Runtime fp32): lesson 04's export when it is
  there and its card checks out, otherwise an export made here with :mod:`deploylab.export`'s functions;
- :func:`student_program` -- the student as an ExecuTorch program (XNNPACK delegate, PT2E INT8 with
  ``XNNPACKQuantizer`` calibrated on training images), built along lesson 04b's exact path and
  verified on real test images (accuracy and agreement with the fp32 student on the card).

:func:`served_model` is the decision: lesson 04b records its measured choice in
``results/<profile>/runtimes.json`` (each row's ``choice``). When it chose "ExecuTorch int8" (the
workshop run: 3.0x ONNX Runtime fp32 at batch 32, 2.8x at batch 1, within 1 point), the Python
servers serve :func:`student_program` with ``--runtime executorch``; any other choice, or no record,
keeps ONNX Runtime fp32 and :func:`served_reason` says why. Only these two runtimes are served: the
other rows of 04b (OpenVINO, AOTInductor, ONNX Runtime INT8) stay in the lesson.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import artefacts, assets, config, data, export, results
from .config import Profile
from .files import atomic_path, atomic_write_json

STUDENT = "student_scratch"  # the student the course deploys: trained on all labels, ahead of the distilled one (lesson 03)
STUDENT_FILE = "models/student.pt"  # its shipped checkpoint (assets.student)
LESSON04_NAME = "student_fp32.onnx"  # written by lesson 04
OWN_NAME = "serve_student_fp32.onnx"
PROGRAM_NAME = "serve_student_int8.pte"  # the ExecuTorch INT8 program, card serve_student_int8.card.json
PROGRAM_CHOICE = "ExecuTorch int8"  # lesson 04b's name for that variant
PROGRAM_MAX_BATCH = 32  # the program's dynamic batch bound: the servers batch up to 16, lesson 05 benches at 32
MIN_AGREEMENT = 0.9  # top-1 agreement with the fp32 student below which the INT8 program is refused (broken calibration)


def student_onnx(profile: Profile, *, threads: int = config.BENCH_THREADS) -> Path:
    """The student's ONNX file with a verified model card.

    Lesson 04's ``student_fp32.onnx`` is used when it is there and its card checks out; otherwise
    the student checkpoint is exported here with the same functions (dynamo exporter, dynamic
    batch), verified against PyTorch on real test images, and saved as ``serve_student_fp32.onnx``.
    """
    folder = config.artefacts_dir(profile)
    for name in (LESSON04_NAME, OWN_NAME):
        path = folder / name
        if path.is_file():
            try:
                export.load_exported(path, profile=profile, threads=threads)
                return path
            except export.ExportError:
                continue  # stale (e.g. the student was retrained): export again below
    student = assets.student(profile)
    path = folder / OWN_NAME
    x_test, y_test = data.tensors("test", profile.test_images)
    info = export.export_onnx(student.model, path, example=x_test[:2])
    par = export.verify(path, x_test, assets.logits("student", "test", profile), y_test, threads=threads)
    export.write_card(path, role="student", arch=student.meta["arch"], profile=profile, precision="fp32",
                      exporter=info.exporter, parity=par, accuracy=par.accuracy, test_images=par.images,
                      source={"file": "student.pt", "sha256": student.meta.get("sha256")})
    return path


def _program_is_current(path: Path, profile: Profile, student_sha256: str | None) -> bool:
    """The program's card checks out (sha256, data, profile, format) and names the current student checkpoint."""
    if not path.is_file():
        return False
    try:
        card = export.read_card(path)
    except export.ExportError:
        return False
    source = card.get("source_checkpoint") or {}
    return not artefacts.problems(path, card, profile=profile.name, kind="pte") and source.get("sha256") == student_sha256


def _lower_int8(model, calibration, example):
    """Lesson 04b's "ExecuTorch int8": torch.export with a dynamic batch, PT2E with XNNPACKQuantizer, lowered to XNNPACK."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from . import quantize
    from .backends import executorch_xnnpack

    batch = torch.export.Dim("batch", min=1, max=PROGRAM_MAX_BATCH)
    prepared = prepare_pt2e(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module(),
                            executorch_xnnpack.quantizer())  # symmetric INT8, per-channel weights
    quantize.calibrate(prepared, quantize.batches_of(calibration, 32))  # training images, never test images
    converted = convert_pt2e(prepared)
    edge = executorch_xnnpack.lower(torch.export.export(converted, (example,), dynamic_shapes=({0: batch},)))
    rows = executorch_xnnpack.delegation(edge)
    if executorch_xnnpack.undelegated_compute(rows):
        raise export.ExportError(f"XNNPACK did not take {executorch_xnnpack.undelegated_compute(rows)}: the program would be slow")
    return edge, rows


def _build_lesson_program(profile: Profile, student, calibration, example) -> None:
    """Lower the INT8 program into lesson 04b's ``runtimes/student_int8.pte`` through ``harness.built``, with the lesson's settings."""
    from .backends import executorch_xnnpack, harness

    path = config.artefacts_dir(profile) / "runtimes" / "student_int8.pte"
    path.parent.mkdir(parents=True, exist_ok=True)

    def build() -> dict[str, Any]:
        edge, rows = _lower_int8(student.model.eval(), calibration, example)
        executorch_xnnpack.save(edge, path)
        return {"delegation": rows}

    settings = harness.build_settings(student.meta["sha256"], calibration_images=len(calibration), kind="executorch xnnpack int8")
    harness.built(path, settings, build, profile)


def _lesson_program(profile: Profile, student_sha256: str, calibration_images: int) -> tuple[bytes, list] | None:
    """The bytes and delegation table of lesson 04b's own ``runtimes/student_int8.pte`` when it was built with the same
    settings (student, calibration size, library versions: ``harness.built``'s record) and is intact; else None."""
    from .backends import harness

    path = config.artefacts_dir(profile) / "runtimes" / "student_int8.pte"
    meta_path = path.with_name(path.name + ".build.json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        rows = meta["info"]["delegation"]
    except (ValueError, KeyError, TypeError):
        return None  # a record from another version of the lesson: build here instead
    wanted = harness.build_settings(student_sha256, calibration_images=calibration_images, kind="executorch xnnpack int8")
    if meta.get("settings") != wanted or artefacts.problems(path, meta, profile=profile.name):
        return None
    return path.read_bytes(), rows


def student_program(profile: Profile | str | None = None, *, threads: int = config.BENCH_THREADS) -> Path:
    """``serve_student_int8.pte`` and its card in the profile's artefacts folder: built once, reused while its card checks out.

    Lesson 04b's own INT8 program is taken when it was built with the same settings (the bytes it
    measured); otherwise the program is built here along the same path (:func:`_lower_int8`). It is
    written to a temporary name, run there on the profile's test images (accuracy, agreement with
    the fp32 student's logits; refused below :data:`MIN_AGREEMENT`), then renamed; the card
    (``format: pte``, sha256, ``max_batch``, the figures, where it came from) is written last.
    """
    from .backends import executorch_xnnpack, harness
    from .serving import predictor

    profile = config.get_profile(profile)
    student = assets.student(profile)
    path = config.artefacts_dir(profile) / PROGRAM_NAME
    if _program_is_current(path, profile, student.meta.get("sha256")):
        return path
    x_test, y_test = data.tensors("test", profile.test_images)
    calibration = data.calibration_set(harness.sizes(profile).calibration_images)
    reference = assets.logits("student", "test", profile).numpy()
    lesson = _lesson_program(profile, student.meta.get("sha256"), len(calibration))
    built_by = "lesson 04b (runtimes/student_int8.pte)"
    if lesson is None:  # build it as lesson 04b's own cached artefact: the lesson (or make test's run of it) then reuses it
        _build_lesson_program(profile, student, calibration, x_test[:PROGRAM_MAX_BATCH])
        lesson, built_by = _lesson_program(profile, student.meta.get("sha256"), len(calibration)), "deployable.student_program"
        if lesson is None:
            raise export.ExportError("the INT8 program was built but its build record does not check out")
    program_bytes, rows = lesson
    with atomic_path(path) as tmp:
        tmp.write_bytes(program_bytes)
        executorch_xnnpack.set_threads(threads)
        program = predictor.Predictor("executorch", tmp, {}, predictor.numpy_call(executorch_xnnpack.runner(tmp)), PROGRAM_MAX_BATCH)
        logits = program.run(x_test.numpy())
        accuracy = float((logits.argmax(1) == y_test.numpy()).mean())
        agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
        if not np.isfinite(logits).all() or agreement < MIN_AGREEMENT:
            raise export.ExportError(f"the INT8 program agrees with the fp32 student on {agreement:.1%} of {len(x_test)} test images "
                                     f"(at least {MIN_AGREEMENT:.0%} needed): check the calibration images")
    card = artefacts.describe(path, {
        "name": path.stem, "format": "pte", "runtime": "executorch", "delegate": "XNNPACK", "role": "student",
        "arch": student.meta["arch"], "precision": "int8", "quantizer": "XNNPACKQuantizer (PT2E, symmetric, per-channel)",
        "calibration_images": len(calibration), "max_batch": PROGRAM_MAX_BATCH, "preprocessing": export.PREPROCESSING,
        "class_names": list(data.CLASS_NAMES), "accuracy": accuracy, "test_images": len(x_test),
        "agreement_with_fp32": agreement, "fp32_accuracy": float((reference.argmax(1) == y_test.numpy()).mean()),
        "delegation": rows, "built_by": built_by, "source_checkpoint": {"file": "student.pt", "sha256": student.meta.get("sha256")},
        "profile": profile.name})
    atomic_write_json(export.card_path(path), card)
    return path


def runtimes_choice(profile: Profile | str | None = None) -> dict[str, Any] | None:
    """Lesson 04b's recorded choice for ``profile`` (the ``choice`` of its result rows), or None when it has not run."""
    path = results.results_path("runtimes", profile)
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())
    return next((r["choice"] for r in rows if r.get("choice")), None)


def served_reason(profile: Profile | str | None = None) -> str:
    """One line: which runtime the Python servers serve for ``profile`` and why, from lesson 04b's record."""
    profile = config.get_profile(profile)
    choice = runtimes_choice(profile)
    if choice is None:
        return (f"ONNX Runtime fp32: lesson 04b has no record for {profile.name!r} "
                f"(results/{profile.name}/runtimes.json; run notebooks/04b_runtimes.ipynb to choose by measurement)")
    speed = choice.get("speedup", {})
    measured = (f"{speed['32']:.1f}x {choice['baseline']} at batch 32, {speed['1']:.1f}x at batch 1"
                if {"1", "32"} <= set(speed) else "speed not recorded")
    if choice["chosen"] == PROGRAM_CHOICE:
        return f"ExecuTorch int8 (XNNPACK): lesson 04b chose {choice['chosen']} in {profile.name!r} ({measured}, within 1 point)"
    return (f"ONNX Runtime fp32: lesson 04b chose {choice['chosen']} in {profile.name!r} ({measured}); "
            f"the servers switch only to {PROGRAM_CHOICE}, otherwise they keep the fp32 ONNX file")


def served_model(profile: Profile | str | None = None, *, threads: int = config.BENCH_THREADS) -> tuple[Path, str]:
    """(artefact, runtime) the Python servers serve for ``profile``: the ExecuTorch program if 04b chose it, else ONNX fp32."""
    profile = config.get_profile(profile)
    choice = runtimes_choice(profile)
    if choice is not None and choice["chosen"] == PROGRAM_CHOICE:
        return student_program(profile, threads=threads), "executorch"
    return student_onnx(profile, threads=threads), "onnxruntime"


def runtime_start_cost(runtime: str, *, repeats: int = 3) -> dict[str, float]:
    """What a fresh worker pays for ``runtime`` before its first answer, measured: import seconds beyond ``import torch``
    (which the TorchServe handler imports anyway; median of ``repeats`` fresh interpreters each) and the installed megabytes.

    Lessons 05 and 06 keep ONNX Runtime with these figures printed: ExecuTorch's Python runtime
    (``executorch.runtime``) imports its compiler package (``executorch.exir``) on the way to the C++
    pybindings, so each TorchServe worker start -- and each restart after a crash -- would pay it.
    """
    import statistics
    import subprocess
    import sys
    import time

    from .backends import executorch_xnnpack, harness
    from .backends import onnx_runtime as ort_backend

    module, dists = {"executorch": ("executorch.runtime", executorch_xnnpack.INSTALL),
                     "onnxruntime": ("onnxruntime", ort_backend.INSTALL)}[runtime]

    def seconds(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
        return time.perf_counter() - start

    bare = statistics.median(seconds("import torch") for _ in range(repeats))
    imported = statistics.median(seconds(f"import torch, {module}") for _ in range(repeats))
    return {"import_s": max(0.0, imported - bare), "install_mb": harness.install_bytes(dists) / 1e6}


def onnx_runtime_kept(profile: Profile | str | None = None) -> str:
    """Why lessons 05 and 06 serve the ONNX file although 04b may have chosen ExecuTorch: the measured start costs."""
    profile = config.get_profile(profile)
    path, runtime = served_model(profile)
    if runtime == "onnxruntime":
        return served_reason(profile)
    et, ort = runtime_start_cost("executorch"), runtime_start_cost("onnxruntime")
    return (f"04b chose ExecuTorch int8 for {profile.name!r}; this lesson keeps ONNX Runtime fp32 (lesson 04's file): "
            f"measured here, beyond the `import torch` every worker makes, `import executorch.runtime` takes {et['import_s']:.1f} s "
            f"(it imports ExecuTorch's compiler) against {ort['import_s']:.2f} s for onnxruntime, so every worker start and "
            f"restart waits that much longer, and the package installs {et['install_mb']:.0f} MB against {ort['install_mb']:.0f} MB "
            "(what the image of lesson 06 would add). Lesson 07 serves the ExecuTorch "
            "program with TorchServe's handler (`backend: executorch`) and measures what it buys behind HTTP")
