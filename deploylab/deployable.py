"""The model the serving lessons deploy: the student's ONNX file, with a verified model card.

Lessons 05-07 and ``deploylab serve`` serve the same file: lesson 04's export when it is there and
its card checks out, otherwise an export made here with the same functions of
:mod:`deploylab.export`.
"""

from __future__ import annotations

from pathlib import Path

from . import assets, config, data, export
from .config import Profile

STUDENT = "student_scratch"  # the student the course deploys: trained on all labels, ahead of the distilled one (lesson 03)
STUDENT_FILE = "models/student.pt"  # its shipped checkpoint (assets.student)
LESSON04_NAME = "student_fp32.onnx"  # written by lesson 04
OWN_NAME = "serve_student_fp32.onnx"


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
