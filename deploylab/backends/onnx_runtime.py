"""ONNX Runtime from the one ``torch.export`` capture (lesson 04b): fp32 and static INT8 (QDQ).

Lesson 04 taught the path; here it starts from the lesson's ``ExportedProgram`` like every other
runtime, and reuses the kit's helpers: :mod:`deploylab.onnxrt` for sessions (explicit threads, no
spinning) and :mod:`deploylab.onnx_int8` for ``quantize_static`` calibrated on training images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import config, export, onnx_int8, onnxrt
from ..files import atomic_path

RUNTIME = "onnxruntime"
INSTALL = ("onnxruntime",)  # what a server needs for an .onnx file (onnx itself only to build one)


def export_program(program: torch.export.ExportedProgram, path: Path) -> Path:
    """``torch.onnx.export`` of an ``ExportedProgram`` (its dynamic batch kept) to one self-contained file."""
    with atomic_path(path) as tmp, export.exporter_quiet():  # its progress lines are noise in the lesson's outputs
        torch.onnx.export(program, None, str(tmp), dynamo=True, opset_version=export.DYNAMO_OPSET,
                          input_names=[onnxrt.INPUT_NAME], output_names=[export.OUTPUT_NAME], external_data=False,
                          verbose=False)
    return Path(path)


def quantize(fp32_path: Path, path: Path, calibration: torch.Tensor) -> Path:
    """Static INT8 (QDQ, per-channel weights) calibrated on ``calibration`` training images."""
    reader = onnx_int8.CalibrationReader(calibration, batch_size=32)
    return onnx_int8.quantize_int8(fp32_path, path, reader, onnx_int8.Int8Config("qdq", True))


def runner(path: Path, threads: int = config.BENCH_THREADS):
    """A one-argument function (torch batch in, logits tensor out) over a session with ``threads``, no spinning."""
    sess = onnxrt.session(path, threads=threads, spinning=False)
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
