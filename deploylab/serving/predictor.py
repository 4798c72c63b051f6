"""The served model, for any runtime: one ``load`` that every Python server calls.

Lesson 04b chooses the deployed runtime by measurement (``deployable.served_model``); the servers
take it as a parameter (``--runtime``) and load the file through :func:`load`, which gives them one
small object whatever runs underneath:

- ``onnxruntime`` -- a ``.onnx`` file and its model card, through :func:`deploylab.export.load_exported`;
- ``executorch`` -- a ``.pte`` program (XNNPACK delegate) and its card, through
  :mod:`deploylab.backends.executorch_xnnpack` (its thread pool sized first: it is shared by every
  program the process loads).

Both refuse a file whose sha256 differs from its card's, before a single answer is given. The
runtime defaults from the file's suffix; naming a runtime that does not match the file is an error.

A ``.pte`` program plans its memory for the largest batch declared at export (its card's
``max_batch``): :meth:`Predictor.run` splits a larger batch into chunks of that size and joins the
answers (each image's logits do not depend on its neighbours in eval mode), so a caller never
needs to know the bound. The servers batch up to 16, lesson 05 benches at 32: one chunk either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import artefacts, export

RUNTIMES = ("onnxruntime", "executorch")
SUFFIXES = {".onnx": "onnxruntime", ".pte": "executorch"}
FORMATS = {"onnxruntime": "onnx", "executorch": "pte"}  # the card's "format" each runtime needs
MODULES = {"onnxruntime": "onnxruntime", "executorch": "deploylab.backends.executorch_xnnpack"}  # what loading each imports


@dataclass
class Predictor:
    """A loaded model: ``run`` takes a float32 NCHW batch and returns its logits (NumPy, float32)."""

    runtime: str
    path: Path
    card: dict[str, Any]
    call: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    max_batch: int | None = None  # the program's upper bound on the batch (None: no bound)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of ``x`` (N, 1, 32, 32); a batch above :attr:`max_batch` runs in chunks of that size."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or len(x) == 0:
            raise ValueError(f"need a non-empty (N, C, H, W) float32 batch, got shape {x.shape}")
        if self.max_batch is None or len(x) <= self.max_batch:
            return self.call(x)
        return np.concatenate([self.call(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)])


def runtime_for(path: str | os.PathLike, runtime: str | None = None) -> str:
    """The runtime that serves ``path``: ``runtime`` if given (checked against the suffix), else the suffix's."""
    suffix = Path(path).suffix
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if suffix not in SUFFIXES:
        raise ValueError(f"{Path(path).name}: no runtime serves {suffix or 'a file without suffix'!r} files; "
                         f"use a .onnx file (onnxruntime) or a .pte program (executorch)")
    if runtime is not None and SUFFIXES[suffix] != runtime:
        raise ValueError(f"runtime {runtime!r} does not run {Path(path).name}: {suffix} files need {SUFFIXES[suffix]!r} "
                         f"(choices: {', '.join(f'{r} for {s}' for s, r in SUFFIXES.items())})")
    return SUFFIXES[suffix]


def load(path: str | os.PathLike, *, runtime: str | None = None, threads: int = 1) -> Predictor:
    """Load ``path`` for ``runtime`` (default: from its suffix) with ``threads`` intra-op threads, after checking its card."""
    path = Path(path)
    runtime = runtime_for(path, runtime)
    if runtime == "onnxruntime":
        return _onnxruntime(path, threads)
    return _executorch(path, threads)


def _onnxruntime(path: Path, threads: int) -> Predictor:
    """An ONNX Runtime session (sha256 and inputs checked against the card by ``load_exported``)."""
    sess, card = export.load_exported(path, threads=threads)
    name = sess.get_inputs()[0].name
    return Predictor("onnxruntime", path, card, lambda x: sess.run(None, {name: x})[0])


def checked_card(path: Path, kind: str) -> dict[str, Any]:
    """The card of ``path`` after :func:`deploylab.artefacts.problems` (sha256, data, format); raises ExportError."""
    if not path.is_file():
        raise export.ExportError(f"no model file at {path}")
    card = export.read_card(path)
    problems = artefacts.problems(path, card, kind=kind)
    if problems:
        raise export.ExportError(f"refusing {path}: " + "; ".join(problems)
                                 + ". Build it again (deployable.student_program(profile) for the served student).")
    return card


def _executorch(path: Path, threads: int) -> Predictor:
    """An ExecuTorch program's ``forward`` with XNNPACK's pool at ``threads``; NumPy in and out."""
    card = checked_card(path, FORMATS["executorch"])
    from ..backends import executorch_xnnpack  # the one module of the kit that imports executorch

    executorch_xnnpack.set_threads(threads)
    return Predictor("executorch", path, card, numpy_call(executorch_xnnpack.runner(path)), max_batch=int(card["max_batch"]))


def numpy_call(forward):
    """NumPy in, NumPy out over a torch-tensor ``forward`` (an ExecuTorch program's method)."""
    import torch  # the program's inputs and outputs are torch tensors

    def call(x: np.ndarray) -> np.ndarray:
        return forward(torch.from_numpy(x)).numpy().copy()  # copied: the program's output buffer is reused by the next call
    return call
