"""The decision table: every variant the course built, side by side, and which ones fit a budget.

Read from the lessons' records (``results/<profile>/*.json``, :func:`deploylab.results.read_results`)
-- never typed in. :data:`CATALOGUE` names the variants of the course and where each lesson wrote it;
a variant whose lesson has not been run in a profile is reported missing, never invented.

Plain functions, unit-tested; :mod:`deploylab.widgets` is only a thin interactive layer over
:func:`qualifying`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .config import Profile
from .results import read_results


@dataclass(frozen=True)
class Entry:
    """One variant of the course: its label and the records (lesson, variant) that describe it.

    ``sources`` are tried in order (the first present wins). A served variant has a ``throughput_source``
    too: latency comes from its run at concurrency 1, throughput from its run at concurrency 32.
    """

    label: str
    kind: str  # pytorch | onnxruntime | served
    sources: tuple[tuple[str, str], ...]
    throughput_source: tuple[str, str] | None = None


CATALOGUE: tuple[Entry, ...] = (
    Entry("teacher fp32 (ResNet50)", "pytorch", (("baseline", "teacher"),)),
    Entry("student fp32, from scratch", "pytorch", (("distillation", "student_scratch"), ("baseline", "student"))),
    Entry("student distilled", "pytorch", (("distillation", "student_distilled"),)),
    Entry("student INT8 static (PT2E)", "pytorch", (("quantization", "student int8 static"),)),
    Entry("student INT8 QAT", "pytorch", (("quantization", "student int8 QAT"),)),
    Entry("student structured-pruned 50%", "pytorch", (("pruning", "student ch-50% guided"), ("pruning", "student ch-50%"))),
    Entry("student pruned, ONNX Runtime", "onnxruntime", (("pruning", "student ch-50% guided (onnxruntime)"),)),
    Entry("teacher ONNX fp32", "onnxruntime", (("onnx", "teacher ort fp32"),)),
    Entry("teacher ONNX INT8", "onnxruntime", (("onnx", "teacher ort int8"),)),
    Entry("student ONNX fp32", "onnxruntime", (("onnx", "student ort fp32"),)),
    Entry("student ONNX INT8", "onnxruntime", (("onnx", "student ort int8"),)),
    Entry("served: TorchServe", "served", (("torchserve", "student c1"),), ("torchserve", "student c32")),
    Entry("served: TorchServe (lesson 07 run)", "served", (("end_to_end", "torchserve c1"),), ("end_to_end", "torchserve c32")),
    Entry("served: custom ASGI server", "served", (("end_to_end", "custom server c1"),), ("end_to_end", "custom server c32")),
    Entry("served: serverless function", "served", (("end_to_end", "serverless c1"),), ("end_to_end", "serverless c32")),
    Entry("served: LitServe", "served", (("end_to_end", "litserve c1"),), ("end_to_end", "litserve c32")),
    Entry("served: Ray Serve, 1 replica", "served", (("scale_out", "ray serve, 1 replica(s) c1"),),
          ("scale_out", "ray serve, 1 replica(s) c32")),
)

COLUMNS = ("variant", "kind", "accuracy", "p50 ms b1", "p50 ms b32", "images/s", "size MB", "source")


@dataclass(frozen=True)
class Row:
    """One line of the decision table (None: not measured for this variant)."""

    variant: str
    kind: str
    accuracy: float | None  # fraction
    p50_ms_b1: float | None  # one image (a served variant: one request at concurrency 1)
    p50_ms_b32: float | None  # a batch of 32 (not defined for a served variant)
    images_per_s: float | None  # at batch 32, or served at concurrency 32
    size_bytes: int | None
    source: str  # "lesson/variant" of the record(s)

    def latency(self, batch_size: int) -> float | None:
        """p50 latency (ms) of a call at ``batch_size`` (1 or 32)."""
        if batch_size not in (1, 32):
            raise ValueError(f"the records hold batch sizes 1 and 32, not {batch_size}")
        return self.p50_ms_b1 if batch_size == 1 else self.p50_ms_b32

    def display(self) -> dict[str, Any]:
        """The row for a table, in readable units."""
        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        return {"variant": self.variant, "kind": self.kind,
                "accuracy": "-" if self.accuracy is None else f"{100 * self.accuracy:.2f}%",
                "p50 ms b1": num(self.p50_ms_b1, ".2f"), "p50 ms b32": num(self.p50_ms_b32, ".2f"),
                "images/s": num(self.images_per_s, ".0f"),
                "size MB": "-" if self.size_bytes is None else f"{self.size_bytes / 1e6:.2f}", "source": self.source}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _index(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["lesson"], r["variant"]): r for r in records}


def _p50(record: dict[str, Any], batch: str) -> float | None:
    return (record.get("latency_ms", {}).get(batch) or {}).get("p50_ms")


def build_rows(records: Sequence[dict[str, Any]], catalogue: Sequence[Entry] = CATALOGUE) -> tuple[list[Row], list[str]]:
    """The decision rows present in ``records``, and the labels of the catalogue's variants that are missing
    (with the lesson file that would hold them)."""
    idx = _index(records)
    rows, missing = [], []
    for entry in catalogue:
        key = next((k for k in entry.sources if k in idx), None)
        if key is None:
            missing.append(f"{entry.label} (needs {' or '.join(f'{lesson}.json: {v!r}' for lesson, v in entry.sources)})")
            continue
        rec = idx[key]
        if entry.kind == "served":
            thr_rec = idx.get(entry.throughput_source) if entry.throughput_source else None
            thr = (thr_rec or {}).get("throughput", {}).get("1")
            rows.append(Row(entry.label, entry.kind, rec.get("accuracy"), _p50(rec, "1"), None, thr, rec.get("size_bytes"),
                            f"{key[0]}/{key[1]}" + (f" + {entry.throughput_source[1]}" if thr_rec else "")))
        else:
            rows.append(Row(entry.label, entry.kind, rec.get("accuracy"), _p50(rec, "1"), _p50(rec, "32"),
                            rec.get("throughput", {}).get("32"), rec.get("size_bytes"), f"{key[0]}/{key[1]}"))
    return rows, missing


def load(profile: Profile | str | None = None) -> tuple[list[Row], list[str]]:
    """:func:`build_rows` of the records of ``profile``."""
    return build_rows(read_results(profile))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (latency, accuracy) points are Pareto-optimal: no other point is at least as fast AND at
    least as accurate, and strictly better in one. Lower latency and higher accuracy are better."""
    flags = []
    for i, (lat, acc) in enumerate(points):
        if any(math.isnan(v) for v in (lat, acc)):
            raise ValueError(f"point {i} has a NaN: {(lat, acc)}")
        dominated = any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def pareto_rows(rows: Sequence[Row], batch_size: int = 1) -> list[tuple[Row, bool]]:
    """The rows that have accuracy and latency at ``batch_size``, each with its Pareto flag."""
    usable = [r for r in rows if r.accuracy is not None and r.latency(batch_size) is not None]
    flags = pareto_front([(r.latency(batch_size), r.accuracy) for r in usable])
    return list(zip(usable, flags))


def qualifying(rows: Sequence[Row], *, latency_budget_ms: float, min_accuracy: float, batch_size: int = 1) -> list[Row]:
    """The variants whose p50 latency at ``batch_size`` fits the budget and whose accuracy reaches the
    minimum (a fraction), fastest first. Variants not measured at that batch size, or without an
    accuracy, do not qualify: an unknown is not a yes."""
    if latency_budget_ms <= 0:
        raise ValueError(f"latency_budget_ms must be > 0, got {latency_budget_ms}")
    if not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy is a fraction in [0, 1], got {min_accuracy}")
    ok = [r for r in rows if r.accuracy is not None and r.accuracy >= min_accuracy
          and r.latency(batch_size) is not None and r.latency(batch_size) <= latency_budget_ms]
    return sorted(ok, key=lambda r: (r.latency(batch_size), -r.accuracy))


def markdown(rows: Sequence[Row]) -> str:
    """A Markdown table of rows (readable units)."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        d = r.display()
        out.append("| " + " | ".join(str(d[c]) for c in COLUMNS) + " |")
    return "\n".join(out)
