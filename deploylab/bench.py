"""Measuring speed honestly: latency percentiles, interleaved comparisons, throughput, size.

Rules (docs/ARCHITECTURE.md, "Measuring"): warm up first; compare variants in interleaved rounds
(A B C A B C ...) so that drift of the machine -- thermal, a background job -- hits all of them
alike; report p50/p90/p99 and mean; batch 1 and batch 32; set the thread count explicitly and
record it with the hardware report.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import Profile, get_profile
from .machine_load import measure_quietly
from .tables import markdown_table

BATCH_SIZES = (1, 32)


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one variant at one batch size, in milliseconds, and the throughput it implies."""

    batch_size: int
    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # images per second at this batch size (batch_size / mean latency)

    def to_dict(self) -> dict:
        return asdict(self)


def latency_percentiles(samples_ms: list[float] | np.ndarray, batch_size: int = 1) -> LatencyStats:
    """Summarise latency samples (ms). Percentiles use linear interpolation (NumPy's default)."""
    s = np.asarray(samples_ms, dtype=float)
    if s.size == 0:
        raise ValueError("no latency samples to summarise")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("latency samples must be finite and non-negative")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    mean = float(s.mean())
    return LatencyStats(
        batch_size=batch_size,
        n=int(s.size),
        mean_ms=mean,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        min_ms=float(s.min()),
        max_ms=float(s.max()),
        throughput=batch_size / (mean / 1000.0) if mean > 0 else float("inf"),
    )


def example_inputs(images: torch.Tensor, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict[int, torch.Tensor]:
    """Real preprocessed images cut into one input per batch size (repeated if too few)."""
    if len(images) == 0:
        raise ValueError("need at least one image to build benchmark inputs")
    out = {}
    for b in batch_sizes:
        reps = -(-b // len(images))
        out[b] = images.repeat(reps, 1, 1, 1)[:b].contiguous()
    return out


def as_callable(variant: nn.Module | Callable) -> Callable[[torch.Tensor], object]:
    """A module is run in eval mode under inference_mode; anything else is called as it is."""
    if isinstance(variant, nn.Module):
        variant.eval()

        def run(x: torch.Tensor):
            with torch.inference_mode():
                return variant(x)

        return run
    return variant


def _time_calls(fn: Callable, x: torch.Tensor, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn(x)
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def compare_latency(
    variants: Mapping[str, nn.Module | Callable],
    inputs: Mapping[int, torch.Tensor],
    *,
    profile: Profile | None = None,
    threads: int | None = None,
    warmup: int | None = None,
    rounds: int | None = None,
    repeats: int | None = None,
    progress: bool = True,
) -> dict[str, dict[int, LatencyStats]]:
    """Latency of every variant at every batch size, measured in interleaved rounds.

    For each batch size: every variant is warmed up, then ``rounds`` times each variant in turn
    is timed for ``repeats`` calls. Counts default to the profile's. A run during which other processes
    took more than :data:`~deploylab.machine_load.BUSY_SHARE` of the CPU is run again, and labelled if
    the machine stays busy (:func:`~deploylab.machine_load.measure_quietly`). ``threads`` (if given) is set
    with ``torch.set_num_threads`` before measuring; callers of other runtimes (ONNX Runtime) set
    theirs in the session options.
    """
    if not variants:
        raise ValueError("nothing to compare: pass at least one variant")
    p = profile or get_profile()
    warmup = p.bench_warmup if warmup is None else warmup
    rounds = p.bench_rounds if rounds is None else rounds
    repeats = p.bench_repeats if repeats is None else repeats
    if rounds < 1 or repeats < 1:
        raise ValueError("rounds and repeats must be at least 1")
    if threads is not None:
        torch.set_num_threads(threads)
    fns = {name: as_callable(v) for name, v in variants.items()}
    from tqdm.auto import tqdm

    def measure() -> dict[str, dict[int, list[float]]]:
        samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in inputs} for name in fns}
        with tqdm(total=len(inputs) * rounds * len(fns), desc="benchmark", unit="run", disable=not progress, leave=False) as bar:
            for b, x in inputs.items():
                for fn in fns.values():
                    _time_calls(fn, x, warmup)
                for _ in range(rounds):
                    for name, fn in fns.items():
                        samples[name][b].extend(_time_calls(fn, x, repeats))
                        bar.update(1)
        return samples

    samples, _ = measure_quietly(measure)  # measured again if other work took the cores meanwhile, else labelled
    return {name: {b: latency_percentiles(s, b) for b, s in per.items()} for name, per in samples.items()}


def file_size(path: str | os.PathLike) -> int:
    """Size on disk in bytes of a file, or of all files under a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def state_dict_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of the weights file you would ship."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


THROUGHPUT_COLUMN = "images/s (batch / mean)"
THROUGHPUT_NOTE = (f"*{THROUGHPUT_COLUMN}*: the batch size divided by the mean latency -- one caller running batches back to "
                   "back on these threads, not a server's throughput under load (the p50 columns are per batch).")


def latency_table(results: Mapping[str, Mapping[int, LatencyStats]]) -> str:
    """Markdown table of :func:`compare_latency` results (one row per variant and batch size), its throughput column defined below it.

    Why the note: "images/s" beside p50 columns reads like a served rate; it is batch / mean latency of one caller.
    """
    table = markdown_table([
        {"variant": name, "batch": b, "p50 ms": f"{s.p50_ms:.2f}", "p90 ms": f"{s.p90_ms:.2f}", "p99 ms": f"{s.p99_ms:.2f}",
         "mean ms": f"{s.mean_ms:.2f}", THROUGHPUT_COLUMN: f"{s.throughput:.0f}"}
        for name, per in results.items() for b, s in sorted(per.items())])
    return f"{table}\n\n{THROUGHPUT_NOTE}"


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example``, counted by PyTorch's ``FlopCounterMode``.

    The counter reports FLOPs of convolutions and matrix products (2 per multiply-add, groups and
    strides accounted for) and ignores cheap element-wise work (BatchNorm, ReLU, adds), the usual
    convention for MACs; so MACs = FLOPs / 2.
    """
    return sum(macs_by_layer_type(model, example).values())


def macs_by_layer_type(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """:func:`count_macs` split into ``Conv2d`` (convolutions) and ``Linear`` (matrix products).

    Shows where a model's work is: dynamic quantization of ``Linear`` layers can only speed up the
    ``Linear`` share.
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
    totals = {"Conv2d": 0, "Linear": 0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).rsplit(".", 1)[-1]  # aten.convolution, aten.addmm, aten.mm ...
        totals["Conv2d" if "conv" in name else "Linear"] += flops // 2
    return totals
