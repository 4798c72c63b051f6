"""What machine a number was measured on: CPU model, cores, vector/matrix extensions, GPU, versions.

Every result record carries this report, because a latency means nothing without the hardware it
was measured on (INT8 pays off with VNNI/AMX and may not without them).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

# The instruction-set extensions that decide how fast fp32/bf16/int8 inference runs on x86.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not available, e.g. macOS)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on (missing ones are left out): part of every
    hardware report and of every artefact's metadata."""
    out = {}
    for name in ("deploylab", "torch", "torchvision", "numpy", "onnx", "onnxruntime", "torchao", "torch-pruning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def hardware_report() -> dict:
    """A JSON-ready description of this machine and the thread count PyTorch uses now."""
    flags = cpu_flags()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": {f: f in flags for f in REPORTED_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        # 1-minute load average when the report was taken: other work on the machine slows every
        # variant of an interleaved comparison alike, but inflates all absolute latencies.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def format_report(report: dict | None = None) -> str:
    """The report as a few human-readable lines for a notebook."""
    r = report or hardware_report()
    present = [f for f, on in r["cpu_flags"].items() if on] or ["none of " + ", ".join(REPORTED_FLAGS)]
    lines = [
        f"CPU: {r['cpu']} ({r['machine']}), {r['usable_cores']} usable of {r['logical_cores']} logical cores",
        f"CPU extensions: {', '.join(present)}; PyTorch kernels: {r['torch_cpu_capability']}",
        f"PyTorch threads: {r['torch_threads']}; load average (1 min) now: {r.get('load_average_1min')}",
        f"GPU: {r['gpu']['name'] + ' (' + str(r['gpu']['memory_gib']) + ' GiB)' if r['gpu'] else 'none'}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
    ]
    return "\n".join(lines)
