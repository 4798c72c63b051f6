"""Measuring runtimes side by side (lesson 04b): sizes, threads, interleaved rounds, the matmul floor.

Every runtime of the lesson owns a thread pool of its own (ONNX Runtime's intra-op pool, OpenVINO's
TBB arena, XNNPACK's pthreadpool, PyTorch's OpenMP pool). In one interleaved run they take turns on
the same cores, so each pool is sized explicitly and none may busy-wait after a call: a spinning
pool steals the next variant's time and ranks the runtimes by their neighbours, not by themselves.

- :data:`SIZES` / :func:`sizes` -- the lesson's sizes per profile;
- :func:`thread_settings` -- the pool settings of every runtime, as printed by the lesson;
- :func:`interleaved` -- p50 and p99 over all calls plus each round's median (the spread);
- :func:`matmul_gflops` and :func:`floor_ms` -- the machine's fp32 matmul rate and what it implies
  for a model of known FLOPs;
- :func:`cold_start` -- load and first answer in a fresh process, with its peak memory;
- :func:`install_bytes` -- what a runtime's wheels add to an install;
- :func:`built` -- an artefact built once per student, settings and library versions, reused after
  (lowering to ExecuTorch or compiling with AOTInductor takes tens of seconds on 2 cores).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import artefacts, bench, config
from ..config import Profile
from ..files import atomic_write_json
from ..machine_load import measure_quietly


@dataclass(frozen=True)
class RuntimeSizes:
    """Sizes of lesson 04b per profile. ``None`` means the whole test set."""

    test_images: int | None  # test images every variant is scored on
    calibration_images: int  # TRAINING images for the INT8 variants
    warmup: int  # untimed calls per variant and batch size
    rounds: int  # interleaved rounds (A B C ... A B C ...)
    repeats: int  # timed calls per variant, batch size and round
    cold_starts: int  # fresh processes per variant (the median is reported)
    matmul_size: int  # n of the n x n fp32 matmul that measures the machine's rate
    bootstrap: int  # resamples of the paired accuracy intervals


SIZES: dict[str, RuntimeSizes] = {
    "smoke": RuntimeSizes(test_images=128, calibration_images=16, warmup=1, rounds=2, repeats=2, cold_starts=1,
                          matmul_size=512, bootstrap=200),
    "workshop": RuntimeSizes(test_images=None, calibration_images=256, warmup=5, rounds=7, repeats=20, cold_starts=1,
                             matmul_size=1024, bootstrap=2000),
    "full": RuntimeSizes(test_images=None, calibration_images=512, warmup=10, rounds=11, repeats=30, cold_starts=3,
                         matmul_size=1024, bootstrap=5000),
}


def sizes(profile: Profile) -> RuntimeSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


def quiet_library_logs() -> None:
    """Keep known noise out of the lesson's outputs: progress bars and C++-side log lines that say nothing about results.

    NNCF draws rich progress bars (as widgets in Jupyter); PyTorch logs that no CUDA is found when
    it builds C++ code and that a pytree registration is deprecated; Inductor's INT8 lowering warns
    about its own tensor copy. Errors still show.
    """
    for name in ("torch.utils.cpp_extension", "torch.utils._pytree", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)  # Inductor's INT8 lowering
    import rich

    rich.reconfigure(quiet=True, force_jupyter=False)  # NNCF's progress bars (widgets in Jupyter); nothing else uses rich


@contextlib.contextmanager
def native_stderr_silenced():
    """Silence stderr for the block, both file descriptor 2 and Python's ``sys.stderr``.

    C++ libraries log there: ExecuTorch's runtime prints its CPU probing and thread-pool resets
    through Python's ``sys.stderr`` (its pybind layer), other native code writes to descriptor 2.
    """
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def thread_settings(threads: int = config.BENCH_THREADS) -> dict[str, str]:
    """How each runtime's pool is set in this lesson: the settings printed next to every figure."""
    return {
        "PyTorch (eager, torch.compile, AOTInductor)": f"torch.set_num_threads({threads}) (OpenMP: brief spin, OMP_WAIT_POLICY unset)",
        "ONNX Runtime": f"intra_op_num_threads={threads}, inter_op_num_threads=1, session.intra_op.allow_spinning=0",
        "OpenVINO": f"INFERENCE_NUM_THREADS={threads}, NUM_STREAMS=1, PERFORMANCE_HINT=LATENCY, ENABLE_CPU_PINNING=False",
        "ExecuTorch (XNNPACK)": f"pthreadpool of {threads} threads (_unsafe_reset_threadpool), no spinning between calls",
    }


@dataclass(frozen=True)
class Timing:
    """One variant at one batch size: p50/p99 over every timed call and each round's median (ms)."""

    batch_size: int
    stats: bench.LatencyStats
    round_medians: tuple[float, ...]

    @property
    def spread(self) -> tuple[float, float]:
        """Fastest and slowest round median: how far apart the rounds of one run were."""
        return min(self.round_medians), max(self.round_medians)

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ms": self.stats.p50_ms, "p99_ms": self.stats.p99_ms, "mean_ms": self.stats.mean_ms,
                "round_medians_ms": list(self.round_medians), "n": self.stats.n}


def interleaved(
    variants: Mapping[str, Callable[[torch.Tensor], object]],
    inputs: Mapping[int, torch.Tensor],
    *,
    warmup: int,
    rounds: int,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[int, Timing]]:
    """Time every variant at every batch size in interleaved rounds, keeping each round's median.

    Per batch size: every variant is warmed up, then ``rounds`` times each variant in turn runs
    ``repeats`` timed calls (:func:`deploylab.bench.compare_latency` does the same but keeps no
    per-round figures; the spread of the round medians is what says whether a ratio is real).
    A run on a busy machine is measured again, or labelled (:func:`deploylab.machine_load.measure_quietly`).
    """
    if not variants or rounds < 1 or repeats < 1:
        raise ValueError("need at least one variant, one round and one repeat")

    def measure() -> dict[str, dict[int, list[list[float]]]]:
        samples: dict[str, dict[int, list[list[float]]]] = {n: {b: [] for b in inputs} for n in variants}
        for b, x in inputs.items():
            for fn in variants.values():
                bench._time_calls(fn, x, warmup)
            for r in range(rounds):
                for name, fn in variants.items():
                    samples[name][b].append(bench._time_calls(fn, x, repeats))
                if progress:
                    progress(f"batch {b}: round {r + 1} of {rounds}")
        return samples

    samples, _ = measure_quietly(measure)  # measured again if other work took the cores meanwhile, else labelled
    return {name: {b: Timing(b, bench.latency_percentiles([s for rnd in per for s in rnd], b),
                             tuple(statistics.median(rnd) for rnd in per))
                   for b, per in by_b.items()} for name, by_b in samples.items()}


def matmul_gflops(n: int = 1024, threads: int = config.BENCH_THREADS, repeats: int = 10) -> float:
    """The machine's fp32 matrix-multiply rate in GFLOP/s: the best of ``repeats`` n x n products.

    A large fp32 matmul is the best case of every CPU kernel library (all of them call a tuned
    GEMM), so a model's FLOPs over this rate is a floor that no fp32 runtime can beat by much.
    """
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def floor_ms(flops_per_image: float, batch_size: int, gflops: float) -> float:
    """The time ``batch_size`` images take at the matmul rate: the fp32 floor of a model."""
    return flops_per_image * batch_size / (gflops * 1e9) * 1000


COLDSTART_SCRIPT = Path(__file__).with_name("coldstart.py")


def cold_start(kind: str, path: Path, images: torch.Tensor, *, threads: int = config.BENCH_THREADS,
               repeats: int = 1, logits_out: Path | None = None) -> dict[str, float]:
    """Load + first answer of ``path`` on real ``images`` in ``repeats`` fresh processes; the median run.

    The child (:mod:`.coldstart`, run as a script so that it imports no more than a server would)
    times its own imports, the load and the first call, and reports its peak resident memory: what
    a server or a serverless function pays on start, without the model's Python class. ``wall_s``
    adds the interpreter's own start. With ``logits_out`` the child saves its answer there.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    inputs = Path(path).with_name(f".coldstart-{Path(path).stem}-{len(images)}.npy")
    np.save(inputs, images.numpy())
    runs = []
    try:
        for _ in range(repeats):
            cmd = [sys.executable, str(COLDSTART_SCRIPT), kind, str(path), str(inputs), str(threads)]
            start = time.perf_counter()
            out = subprocess.run(cmd + ([str(logits_out)] if logits_out else []), capture_output=True, text=True,
                                 timeout=600, cwd=config.ROOT)
            wall = time.perf_counter() - start
            if out.returncode != 0:
                raise RuntimeError(f"cold start of {kind} {Path(path).name} failed: {out.stderr.strip()[-800:]}")
            runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": wall})
    finally:
        inputs.unlink(missing_ok=True)
    runs.sort(key=lambda r: r["load_s"] + r["first_s"])
    return runs[len(runs) // 2]


def artefact_bytes(*paths: Path) -> int:
    """Bytes of the files that would ship: an OpenVINO ``.xml`` counts with its ``.bin``."""
    total = 0
    for p in map(Path, paths):
        total += p.stat().st_size + (p.with_suffix(".bin").stat().st_size if p.suffix == ".xml" else 0)
    return total


def install_bytes(names: tuple[str, ...]) -> int:
    """Bytes the installed files of the distributions ``names`` take (from their RECORD files)."""
    total = 0
    for name in names:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for f in dist.files or ():
            p = Path(dist.locate_file(f))
            if p.is_file():
                total += p.stat().st_size
    return total


BUILD_LIBRARIES = ("torch", "torchao", "executorch", "openvino", "nncf", "onnxruntime", "onnx", "onnxscript")
BUILD_VERSION = 1  # bump when the lesson's build steps change: every cached artefact is rebuilt


def build_settings(student_sha256: str, **settings: Any) -> dict[str, Any]:
    """Everything that decides a built artefact: the student's sha256, the libraries' versions, ``settings``."""
    versions = {}
    for name in BUILD_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return json.loads(json.dumps({"student_sha256": student_sha256, "versions": versions,
                                  "build_version": BUILD_VERSION, **settings}, sort_keys=True))


def built(path: Path, settings: dict[str, Any], build: Callable[[], dict[str, Any]],
          profile: Profile) -> tuple[dict[str, Any], bool]:
    """``build()`` writes ``path`` (atomically) and returns what to remember of it; reused while ``settings`` hold.

    The metadata (``<file>.build.json``, written last) records ``settings``, the artefact's sha256
    and what ``build`` returned; a later call with the same settings and an intact file returns
    that record and ``True`` instead of building again. Returns ``(info, reused)``.
    """
    path = Path(path)
    meta_path = path.with_name(path.name + ".build.json")
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("settings") == settings and not artefacts.problems(path, meta, profile=profile.name):
            return meta["info"], True
    start = time.perf_counter()
    info = {**build(), "build_seconds": None}
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    if not path.is_file():
        raise FileNotFoundError(f"the build step did not write {path}")
    meta = artefacts.describe(path, {"profile": profile.name, "settings": settings, "info": info})
    atomic_write_json(meta_path, meta)
    return json.loads(json.dumps(info)), False
