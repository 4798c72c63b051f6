"""ONNX Runtime sessions with explicit threads, and running them (lessons 04-07).

- :func:`session` -- an ONNX Runtime CPU session with explicit threads and graph optimization level;
- :func:`run` -- the logits of any number of inputs, in batches;
- :func:`as_callable` -- a one-argument function for :func:`deploylab.bench.compare_latency`.

Exporting a model and its model card are :mod:`deploylab.export`; static INT8 is
:mod:`deploylab.onnx_int8` (kept apart: ``onnxruntime.quantization`` is a heavy import that a
server does not need).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from . import config
from .files import shown

INPUT_NAME = "input"  # the input of every model deploylab.export writes


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------

OPT_LEVELS = ("disable", "basic", "extended", "all")


def session(
    path: str | os.PathLike,
    *,
    threads: int = config.BENCH_THREADS,
    optimization: str = "all",
    optimized_path: str | os.PathLike | None = None,
    spinning: bool = False,
):
    """An ONNX Runtime CPU session with explicit threads and graph optimization level.

    ``threads`` is the intra-op pool size (the calling thread counts as one of them);
    ``inter_op`` stays 1 (sequential execution). ``optimization`` is one of :data:`OPT_LEVELS`;
    ``optimized_path`` saves the graph after optimization (at level ``all`` it contains
    CPU-specific fused/layout ops: save at ``extended`` for a portable file). ``spinning=False``
    stops the pool threads from busy-waiting after each run: on 2 shared cores a spinning pool would
    steal time from whatever runs next (the next variant of an interleaved benchmark, a web server).
    """
    if optimization not in OPT_LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(OPT_LEVELS)}, got {optimization!r}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {shown(path)}; export it first (export.export_onnx)")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path is not None:
        Path(optimized_path).parent.mkdir(parents=True, exist_ok=True)
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def as_float32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``x`` as the contiguous float32 array ONNX Runtime takes; any other dtype is refused (not cast)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.float32:
        raise TypeError(f"ONNX model inputs are float32 (data.preprocess output), got {arr.dtype}")
    return np.ascontiguousarray(arr)


def run(sess, x: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of an ONNX Runtime session for all of ``x``, in batches."""
    arr = as_float32(x)
    name = sess.get_inputs()[0].name
    if len(arr) == 0:
        raise ValueError("no inputs to run")
    return np.concatenate([sess.run(None, {name: arr[i : i + batch_size]})[0] for i in range(0, len(arr), batch_size)])


def as_callable(sess) -> Callable[[torch.Tensor], np.ndarray]:
    """A one-argument function for :func:`deploylab.bench.compare_latency` (takes a torch batch)."""
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})
