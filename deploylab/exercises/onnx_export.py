"""Lesson 04's exercise: save an optimized ONNX graph that other CPUs can run.

ONNX Runtime's ``all`` level rewrites a graph with layout operators (``ReorderInput``,
``*NCHWc``) that only CPUs like this one run; the ``extended`` level fuses without them. The
learner saves the student's graph optimized at ``extended``, opens it with optimizations disabled,
and checks it against PyTorch: ``portable_path`` (the saved file) and ``portable_parity`` (what
``export.verify`` returns for it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import Exercise, WrongAnswer

NAME = "portable_graph"
CHECK_IMAGES = 64  # images run through the saved file with optimizations disabled


def cpu_specific_ops(op_types: dict[str, int] | list[str]) -> list[str]:
    """The operators of ``op_types`` that only the optimizing CPU's layout runs (NCHWc blocks, reorders)."""
    return [op for op in op_types if op.startswith("Reorder") or "NCHWc" in op]


def solution(*, student_onnx: Path, x: torch.Tensor, reference: torch.Tensor, folder: Path) -> dict[str, Any]:
    """Save the graph optimized at ``extended``, then verify the saved file against PyTorch's logits."""
    from deploylab import export, onnxrt

    portable_path = Path(folder) / "student_optimized_extended.onnx"
    onnxrt.session(student_onnx, optimization="extended", optimized_path=portable_path)
    portable_parity = export.verify(portable_path, x, reference)
    return {"portable_path": portable_path, "portable_parity": portable_parity}


def check(answers: dict[str, Any], *, student_onnx: Path, x: torch.Tensor, reference: torch.Tensor,
          folder: Path) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    from deploylab import export, onnxrt

    path, parity = answers["portable_path"], answers["portable_parity"]
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        raise WrongAnswer(f"portable_path must be the path of the saved graph (optimized_path=...), got {path!r}")
    if Path(path).resolve() == Path(student_onnx).resolve():
        raise WrongAnswer("that is the exported file itself: save the graph ONNX Runtime optimized (optimized_path=...)")
    described = export.describe(path)
    ops = described["op_types"]
    specific = cpu_specific_ops(ops)
    if specific:
        raise WrongAnswer(f"not portable: {', '.join(specific)} run only on CPUs like this one; "
                          "save at optimization='extended', not 'all'")
    exported_nodes = export.describe(student_onnx)["nodes"]
    if described["nodes"] >= exported_nodes:
        raise WrongAnswer("the saved graph has as many nodes as the export: it was not optimized "
                          "(optimization='disable' or 'basic' saves little or nothing)")
    if not isinstance(parity, export.Parity):
        raise WrongAnswer(f"portable_parity must be what export.verify(portable_path, ...) returns, got {type(parity).__name__}")
    if parity.top1_agreement < 0.999 or parity.max_abs_diff > parity.tolerance:
        raise WrongAnswer(f"that parity failed ({parity.top1_agreement:.2%} top-1 agreement): verify the saved file "
                          "against the student's PyTorch logits")
    plain = onnxrt.session(path, optimization="disable")
    again = export.parity(onnxrt.run(plain, x[:CHECK_IMAGES]), reference[:CHECK_IMAGES])
    if again.top1_agreement < 0.999 or again.max_abs_diff > again.tolerance:
        raise WrongAnswer(f"opened with optimizations disabled, the saved graph disagrees with PyTorch "
                          f"(max |diff| {again.max_abs_diff:.1e}): is it the student's graph?")
    return (f"{len(ops)} op types, {described['nodes']} nodes (the export has "
            f"{exported_nodes}), top-1 agreement {parity.top1_agreement:.2%} with PyTorch")


def example_inputs() -> dict[str, Any]:
    """The shipped student exported to a temporary folder, 64 real test images and its PyTorch logits."""
    from deploylab import assets, data, export
    from deploylab.train import predict

    folder = Path(tempfile.mkdtemp(prefix="deploylab-exercise-04-"))
    student = assets.student("workshop", build=False).model
    x, _ = data.tensors("test", CHECK_IMAGES)
    path = folder / "student.onnx"
    export.export_onnx(student, path, example=x[:2])
    return {"student_onnx": path, "x": x, "reference": predict(student, x), "folder": folder}


def wrong_answers(answers: dict[str, Any], *, student_onnx: Path, x: torch.Tensor, reference: torch.Tensor,
                  folder: Path) -> list[dict[str, Any]]:
    """Near misses: the graph saved at ``all``, the export itself, a parity of another model, no parity."""
    from deploylab import export, onnxrt

    right_path, right_parity = answers["portable_path"], answers["portable_parity"]
    at_all = Path(folder) / "student_optimized_all.onnx"
    onnxrt.session(student_onnx, optimization="all", optimized_path=at_all)
    wrong = [{"portable_path": student_onnx, "portable_parity": right_parity},
             {"portable_path": right_path, "portable_parity": None},
             {"portable_path": right_path, "portable_parity": export.parity(np.roll(np.asarray(reference), 1, axis=1), reference)}]
    if cpu_specific_ops(export.describe(at_all)["op_types"]):  # on CPUs where `all` adds layout operators
        wrong.append({"portable_path": at_all, "portable_parity": right_parity})
    return wrong


EXERCISE = Exercise(
    name=NAME,
    lesson="04_onnx_export",
    answers=("portable_path", "portable_parity"),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
