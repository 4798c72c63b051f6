"""ExecuTorch with the XNNPACK delegate (lesson 04b): lowering, what was delegated, PT2E INT8, running.

ExecuTorch is PyTorch Mobile's successor: an ``ExportedProgram`` is lowered to an *edge* program,
a partitioner hands the subgraphs a backend supports (here XNNPACK: convolutions, linear layers,
activations, fp32 and INT8) to that backend, and whatever it does not take runs on ExecuTorch's
*portable* kernels -- plain C++ loops, the usual reason an ExecuTorch model is slow. So every
lowering here is followed by a look at what was delegated (:func:`delegation`) and a check that no
convolution or linear layer fell back (:func:`undelegated_compute`).

A program's shapes are fixed at export: the lesson declares the batch dynamic with an upper bound
(memory is planned for the largest batch), one ``.pte`` file for batch 1 and 32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower

from .. import config
from ..files import atomic_write_bytes

RUNTIME = "executorch"
INSTALL = ("executorch",)  # the Python wheel; a device links only the runtime and the delegates it uses
COMPUTE_OPS = ("convolution", "linear", "addmm", "mm", "bmm")  # the operators that must reach XNNPACK


def lower(program: torch.export.ExportedProgram):
    """``to_edge_transform_and_lower`` with the XNNPACK partitioner; returns the edge program manager."""
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


def delegation(edge) -> list[dict[str, Any]]:
    """Per operator of the lowered graph: how many nodes went to XNNPACK and how many stayed on portable kernels."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    return [{"operator": op, "delegated": b.delegated, "not delegated": b.non_delegated}
            for op, b in sorted(info.delegation_by_operator.items())]


def undelegated_compute(rows: list[dict[str, Any]]) -> list[str]:
    """The convolution / linear operators left on portable kernels (empty when XNNPACK took them all)."""
    return [r["operator"] for r in rows if r["not delegated"] and any(k in r["operator"] for k in COMPUTE_OPS)]


def save(edge, path: Path) -> Path:
    """``edge.to_executorch()`` serialised to a ``.pte`` file, written atomically."""
    return atomic_write_bytes(path, edge.to_executorch().buffer)


def set_threads(threads: int = config.BENCH_THREADS) -> None:
    """Size XNNPACK's pthreadpool (it defaults to the machine's cores and is shared by every loaded program)."""
    from .harness import native_stderr_silenced

    with native_stderr_silenced():  # the C++ side logs its CPU probing and the reset on stderr
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)


def runner(path: Path):
    """A one-argument function (torch batch in, logits tensor out) over the ``forward`` method of a ``.pte`` file."""
    from .harness import native_stderr_silenced

    with native_stderr_silenced():
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(Path(path)).load_method("forward")
    return lambda x: method.execute([x])[0]


def quantizer():
    """XNNPACK's PT2E quantizer: symmetric INT8, per-channel weights, static activations."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
