"""ONNX export, verification and model cards (ONNX Runtime sessions and INT8 are :mod:`deploylab.onnxrt`).

The path every exported model takes in this course (lesson 04):

1. :func:`export_onnx` -- ``torch.onnx.export`` with the current (dynamo) exporter: opset 18+,
   a dynamic batch dimension, named input ``input`` and output ``logits``, one self-contained
   file. The legacy TorchScript exporter (``dynamo=False``, opset 13) is kept for contrast only.
2. :func:`verify` -- ``onnx.checker`` (full check) and parity with PyTorch on real test images:
   maximum absolute difference of the logits and top-1 agreement. It raises
   :class:`ParityError` when parity breaks, so a broken export never goes further silently.
3. :func:`write_card` / :func:`load_exported` -- a model card JSON next to each exported file
   (inputs, preprocessing, class names, accuracy, parity, exporter, opset, sha256), which the
   serving lesson reads; loading refuses a file whose sha256 does not match its card.

The servers import this module for :func:`load_exported`, inside a serving image that carries no
training stack (no torchvision): :mod:`deploylab.models` and :mod:`deploylab.train` are therefore
imported inside the two functions that need them, never at the top.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import artefacts, config, data
from .config import Profile
from .files import atomic_path, atomic_write_json, shown
from .onnxrt import INPUT_NAME, run, session

OUTPUT_NAME = "logits"
DYNAMO_OPSET = 18  # the dynamo exporter's default opset (its translation functions are written for 18)
LEGACY_OPSET = 13  # what older blog posts and tutorials use with the TorchScript exporter


class ExportError(RuntimeError):
    """An exported model or its card is missing, invalid, or does not match."""


class ParityError(ExportError):
    """ONNX Runtime's outputs do not match PyTorch's closely enough."""


@dataclass(frozen=True)
class ExportSizes:
    """Lesson-04 sizes per profile. ``None`` means the profile's whole test set.

    The teacher (ResNet50) is evaluated twice (fp32 and INT8); ``smoke`` checks it on a fixed subset
    to keep the lesson short, ``workshop`` and ``full`` on every test image (lesson 04 prints the rate
    it was checked at); the student is always checked on the whole (profile's) test set.
    """

    student_eval_images: int | None
    teacher_eval_images: int | None
    calibration_batch: int = 32  # images per calibration batch fed to ONNX Runtime


SIZES: dict[str, ExportSizes] = {
    "smoke": ExportSizes(student_eval_images=None, teacher_eval_images=128),
    "workshop": ExportSizes(student_eval_images=None, teacher_eval_images=None),
    "full": ExportSizes(student_eval_images=None, teacher_eval_images=None),
}


def sizes(profile: Profile) -> ExportSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


def eval_images(role: str, profile: Profile) -> int:
    """How many test images ``role``'s ONNX variants are evaluated on in ``profile``."""
    total = profile.test_images or 10_000
    limit = {"teacher": sizes(profile).teacher_eval_images, "student": sizes(profile).student_eval_images}.get(role)
    return total if limit is None else min(limit, total)


# --------------------------------------------------------------------------------------------
# 1. Export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What an export produced and how long it took."""

    path: Path
    exporter: str  # "dynamo" or "legacy"
    opset: int
    seconds: float
    files: tuple[str, ...]  # every file written (an external-data file would show up here)
    size_bytes: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _example(example: torch.Tensor | None) -> torch.Tensor:
    """An example batch of two real images (batch 2, not 1: a batch of 1 would get specialised)."""
    if example is None:
        example, _ = data.tensors("test", 2)
    if not isinstance(example, torch.Tensor) or example.ndim != 4:
        raise TypeError("example must be a 4-d float tensor (N, 1, 32, 32), e.g. data.tensors('test', 2)[0]")
    return example[:2] if len(example) >= 2 else example.repeat(2, 1, 1, 1)


def opset_of(path: str | os.PathLike) -> int:
    """The default-domain opset version of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


PROGRESS_PREFIX = "[torch.onnx]"  # how torch.onnx's dynamo exporter starts each progress line


@contextlib.contextmanager
def exporter_quiet() -> Iterator[None]:
    """Drop torch.onnx's progress lines from stdout during the block; every other line still prints.

    Why: the dynamo exporter ``print()``s about eight lines per model ("[torch.onnx] Run
    decompositions... ✅") unless every call passes ``verbose=False`` -- noise in a lesson's committed
    outputs. Warnings (``warnings.warn``, on stderr) and exceptions pass untouched; a failed step's
    line (marked ❌) is kept, since it says where the export stopped.
    """
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [line for line in buf.getvalue().splitlines(keepends=True)
                if not line.startswith(PROGRESS_PREFIX) or "❌" in line]
        sys.stdout.write("".join(kept))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example: torch.Tensor | None = None,
    dynamo: bool = True,
    opset: int | None = None,
) -> ExportInfo:
    """Export any image classifier ``model`` to ``path`` with a dynamic batch dimension.

    ``dynamo=True`` (the default of ``torch.onnx.export`` since PyTorch 2.9) traces with
    ``torch.export`` and writes opset 18 or later; ``dynamo=False`` is the deprecated TorchScript
    exporter (opset 13 by default here, as older posts show it). The dynamo exporter would store
    the weights in a separate ``.onnx.data`` file by default; we ask for one self-contained file
    (``external_data=False``, fine below ONNX's 2 GB protobuf limit) so that one sha256 covers the
    whole model. The file is written to a temporary name and renamed on success.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"name the exported file *.onnx, got {path.name!r}")
    model = model.eval()
    x = _example(example)
    opset = opset or (DYNAMO_OPSET if dynamo else LEGACY_OPSET)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with atomic_path(path) as tmp, exporter_quiet():
        if dynamo:
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=True, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),  # one entry per positional argument
                external_data=False, verbose=False,  # no progress lines (exporter_quiet catches any left)
            )
        else:
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    seconds = time.perf_counter() - start
    extra = external_data_files(path)
    return ExportInfo(path=path, exporter="dynamo" if dynamo else "legacy", opset=opset_of(path),
                      seconds=seconds, files=(path.name, *extra), size_bytes=path.stat().st_size)


def external_data_files(path: str | os.PathLike) -> tuple[str, ...]:
    """Names of the external-data files an ONNX file refers to (empty for a self-contained file)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    names = {  # the weights are the graph's initializers; external ones name their file under "location"
        entry.value
        for t in model.graph.initializer if uses_external_data(t)
        for entry in t.external_data if entry.key == "location"
    }
    return tuple(sorted(names))


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Inputs, outputs (names, element types, shapes with symbolic dims), opset, node count, producer."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def io(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "inputs": io(model.graph.input),
        "outputs": io(model.graph.output),
        "opset": opset_of(path),
        "nodes": len(model.graph.node),
        "op_types": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
    }


def nonstandard_ops(path: str | os.PathLike) -> dict[str, int]:
    """Operators of the graph outside the ONNX standard (``domain.op_type`` -> count), e.g. ONNX Runtime's
    own ``com.microsoft`` contrib ops (QOperator's ``QLinearAdd``, fused ``FusedConv``) or the CPU-layout
    ``com.microsoft.nchwc`` ops of ``ENABLE_ALL``: a graph that holds any runs in ONNX Runtime only."""
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.domain not in ("", "ai.onnx"):
            key = f"{node.domain}.{node.op_type}"
            ops[key] = ops.get(key, 0) + 1
    return dict(sorted(ops.items()))


# --------------------------------------------------------------------------------------------
# 2. Verification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduced the reference logits on ``images`` real inputs."""

    images: int
    max_abs_diff: float
    reference_max_abs: float  # largest |logit| of the reference: the scale the difference compares to
    tolerance: float
    top1_agreement: float
    accuracy: float | None  # of the ONNX model, if labels were given
    reference_accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def check_model(path: str | os.PathLike) -> None:
    """``onnx.checker`` with ``full_check=True`` (also runs strict shape inference); raises ExportError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{shown(path)} is not a valid ONNX model: {e}") from e


def parity(
    onnx_logits: np.ndarray,
    reference: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None = None,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> Parity:
    """Compare two sets of logits: max |difference|, top-1 agreement, and accuracy if labels given.

    The tolerance scales with the reference (``atol + rtol * max|reference|``): the smoke models
    have logits in the thousands, the trained ones around ten, and fp32 rounding scales with them.
    """
    ref = reference.detach().cpu().numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    got = np.asarray(onnx_logits)
    if got.shape != ref.shape:
        raise ParityError(f"ONNX output shape {got.shape} differs from the reference's {ref.shape}")
    scale = float(np.abs(ref).max())
    y = None if labels is None else np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    return Parity(
        images=len(ref),
        max_abs_diff=float(np.abs(got - ref).max()),
        reference_max_abs=scale,
        tolerance=atol + rtol * scale,
        top1_agreement=float((got.argmax(1) == ref.argmax(1)).mean()),
        accuracy=None if y is None else float((got.argmax(1) == y).mean()),
        reference_accuracy=None if y is None else float((ref.argmax(1) == y).mean()),
    )


def verify(
    path: str | os.PathLike,
    inputs: torch.Tensor,
    reference: nn.Module | torch.Tensor | np.ndarray,
    labels: torch.Tensor | None = None,
    *,
    min_agreement: float = 0.999,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    threads: int = config.BENCH_THREADS,
) -> Parity:
    """Check ``path`` with ``onnx.checker`` (full) and compare it with PyTorch on real ``inputs``.

    ``reference`` is the PyTorch model, or its logits on ``inputs`` (e.g. ``assets.logits``, to
    avoid re-running a slow model). Raises :class:`ParityError` if the largest logit difference
    exceeds the tolerance or top-1 agreement is below ``min_agreement``; returns the figures.
    """
    if len(inputs) == 0:
        raise ValueError("verify needs real test images: got an empty input batch")
    check_model(path)
    if isinstance(reference, nn.Module):
        from .train import predict  # lazy: the serving image has no torchvision (see the module docstring)

        reference = predict(reference, inputs)
    if len(reference) != len(inputs):
        raise ValueError(f"{len(reference)} reference logits for {len(inputs)} inputs")
    got = run(session(path, threads=threads), inputs)
    result = parity(got, reference, labels, atol=atol, rtol=rtol)
    problems = []
    if result.max_abs_diff > result.tolerance:
        problems.append(f"max |logit difference| {result.max_abs_diff:.3g} > tolerance {result.tolerance:.3g}")
    if result.top1_agreement < min_agreement:
        problems.append(f"top-1 agreement {result.top1_agreement:.2%} < {min_agreement:.2%}")
    if problems:
        raise ParityError(
            f"{Path(path).name} does not reproduce PyTorch on {result.images} test images: " + "; ".join(problems)
            + ". Check that the model was in eval mode, that the export and the reference see the same "
              "preprocessing (data.preprocess), and that nothing was added to or left out of the module exported."
        )
    return result


# --------------------------------------------------------------------------------------------
# 3. Model cards
# --------------------------------------------------------------------------------------------

PREPROCESSING = {
    "function": "deploylab.data.preprocess",
    "raw_input": "uint8 grayscale image, 28x28 (any square size is resized)",
    "steps": ["bilinear resize to 32x32 (align_corners=False)", "scale to [0, 1] (divide by 255)",
              "subtract mean, divide by std"],
    "image_size": data.IMAGE_SIZE,
    "mean": data.MEAN,
    "std": data.STD,
    "layout": "NCHW float32 (N, 1, 32, 32)",
}


def card_path(onnx_path: str | os.PathLike) -> Path:
    """The model card of ``student_fp32.onnx`` is ``student_fp32.card.json``, next to it."""
    return Path(onnx_path).with_suffix(".card.json")


def write_card(
    onnx_path: str | os.PathLike,
    *,
    role: str,
    arch: str,
    profile: Profile,
    precision: str,
    exporter: str,
    parity: Parity | None,
    accuracy: float | None,
    test_images: int | None,
    source: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write the model card JSON next to ``onnx_path`` (atomically) and return it.

    Inputs, outputs and opset are read from the file itself, never typed by hand.
    """
    path = Path(onnx_path)
    info = describe(path)
    card = artefacts.describe(path, {
        "name": path.stem,
        "file": path.name,
        "format": "onnx",
        "role": role,
        "arch": arch,
        "precision": precision,
        "exporter": exporter,
        "opset": info["opset"],
        "inputs": info["inputs"],
        "outputs": info["outputs"],
        "preprocessing": PREPROCESSING,
        "class_names": list(data.CLASS_NAMES),
        "accuracy": accuracy,
        "test_images": test_images,
        "parity": parity.to_dict() if parity is not None else None,
        "source_checkpoint": source,
        "profile": profile.name,
        **extra,
    })
    atomic_write_json(card_path(path), card)
    return card


def read_card(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The card of ``onnx_path``; raises ExportError if it is missing or not JSON."""
    cp = card_path(onnx_path)
    if not cp.is_file():
        raise ExportError(f"no model card {cp} next to {onnx_path}: export it with lesson 04 (export.write_card)")
    try:
        return json.loads(cp.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{cp} is not valid JSON ({e}); re-export the model") from e


def load_exported(
    onnx_path: str | os.PathLike,
    *,
    profile: Profile | str | None = None,
    threads: int = config.BENCH_THREADS,
    optimization: str = "all",
) -> tuple[Any, dict[str, Any]]:
    """An ONNX Runtime session for ``onnx_path`` and its card, after checking the card.

    Refuses (ExportError) a file whose sha256 differs from its card's, a card of other data, a card
    whose input name is not in the file, and -- if ``profile`` is given -- a card of another profile
    or one exported from a checkpoint that has been replaced since (the export is stale).
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"no exported model at {shown(path)}: run notebooks/04_onnx_export.ipynb first")
    card = read_card(path)
    p = None if profile is None else config.get_profile(profile)
    problems = artefacts.problems(path, card, profile=None if p is None else p.name, kind="onnx")
    if p is not None:
        src = card.get("source_checkpoint") or {}
        if src.get("file") and src.get("sha256"):
            stem = Path(src["file"]).stem  # the teacher and student live with the profile's models, lesson ones with its artefacts
            from .models import ROLES, read_metadata  # lazy: the serving image has no torchvision

            current = read_metadata(config.models_dir(p) if stem in ROLES else config.artefacts_dir(p), stem)
            if current is not None and current.get("sha256") != src["sha256"]:
                problems.append(f"the checkpoint it was exported from, {src['file']}, has been replaced since (retrained?)")
    if problems:
        raise ExportError(f"refusing {shown(path)}: " + "; ".join(problems) + ". Re-export it (notebooks/04_onnx_export.ipynb).")
    sess = session(path, threads=threads, optimization=optimization)
    if [i.name for i in sess.get_inputs()] != [i["name"] for i in card["inputs"]]:
        raise ExportError(f"refusing {shown(path)}: its inputs do not match the card's {card['inputs']}")
    return sess, card


def export_dir(profile: Profile) -> Path:
    """Where this lesson's ONNX files and cards go: the profile's artefacts folder."""
    return config.artefacts_dir(profile)


def install(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy an ONNX file into place atomically (e.g. the chosen INT8 variant from a scratch folder).

    Write its card afterwards (:func:`write_card`): the card holds the sha256 of the copy."""
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst
