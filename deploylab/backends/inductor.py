"""PyTorch's own compiler on the CPU (lesson 04b): AOTInductor packages and ``torch.compile``.

- :func:`package` -- ``torch._inductor.aoti_compile_and_package``: the ExportedProgram compiled ahead
  of time to a shared library inside a ``.pt2`` archive, with *freezing* (weights folded as constants,
  convolution weights pre-packed for oneDNN: without it an INT8 graph keeps its quantize/dequantize
  pairs as separate kernels). A server loads it with ``aoti_load_package`` -- no model class, no
  Python tracing -- the successor of ``torch.jit.save``/``torch.jit.load`` for servers;
- :func:`x86_int8` -- PT2E static INT8 with ``X86InductorQuantizer`` (lesson 01's path), ready to package;
- :func:`compiled` -- ``torch.compile`` in-process, with the time its first calls spent compiling.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .. import quantize

RUNTIME = "aotinductor"
INSTALL = ("torch",)  # aoti_load_package needs libtorch: the whole torch wheel in Python
INDUCTOR_CONFIGS = {"freezing": True}


def package(program: torch.export.ExportedProgram, path: Path) -> tuple[Path, float]:
    """Compile ``program`` to a ``.pt2`` package (freezing on); returns the path and the compile seconds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.pt2")  # aoti_compile_and_package wants a .pt2 name
    start = time.perf_counter()
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=INDUCTOR_CONFIGS)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, time.perf_counter() - start


def runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A one-argument function over ``aoti_load_package(path)`` under ``inference_mode``."""
    loaded = torch._inductor.aoti_load_package(str(path))

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(x)
    return run


def runner_by_batch(paths: dict[int, Path]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One function over one static-shape package per batch size: a batch of n runs the package built for n."""
    runners = {b: runner(p) for b, p in paths.items()}
    return lambda x: runners[len(x)](x)


def x86_int8(model: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """PT2E static INT8 for x86 (``X86InductorQuantizer``), calibrated on ``calibration`` batches of training images."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(quantize.export_for_quantization(model.eval(), example), quantizer)
    quantize.calibrate(prepared, calibration)
    return convert_pt2e(prepared)


def compiled(model: nn.Module, inputs: dict[int, torch.Tensor]) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """``torch.compile(model)`` with freezing; returns it and the seconds its first call per batch size took."""
    fn = torch.compile(model.eval(), options=INDUCTOR_CONFIGS)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in inputs.values():
            fn(x)
    seconds = time.perf_counter() - start

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return fn(x)
    return run, seconds
