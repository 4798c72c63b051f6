"""The decision table: every variant the course built, side by side, and which ones fit a budget.

Read from the lessons' records (``results/<profile>/*.json``, :func:`deploylab.results.read_results`)
-- never typed in. :data:`CATALOGUE` names the variants of the course and where each lesson wrote it;
a variant whose lesson has not been run in a profile is reported missing, never invented.

Each row is one configuration, measured on one machine: a served variant's latency (one request at
concurrency 1) and throughput (concurrency 32) come from the same server configuration, never the best of
two; every row carries the machine its record was measured on (:func:`machine_label`), :func:`markdown`
shows the rows of different machines apart, labelled, and :func:`pareto_rows` / :func:`qualifying`
compare rows of one machine only.

Plain functions, unit-tested; :mod:`deploylab.widgets` is only a thin interactive layer over
:func:`qualifying`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .config import Profile, get_profile
from .data import split_size
from .results import read_results

# The whole Fashion-MNIST test set (10,000 images): what every accuracy of `workshop` and `full` is measured on.
TEST_SET_IMAGES = split_size("test")


@dataclass(frozen=True)
class Entry:
    """One variant of the course: its label and the records (lesson, variant) that describe it.

    ``sources`` are tried in order (the first present wins). A served variant is one server
    configuration (TorchServe with or without dynamic batching, the custom server in one or two
    processes: each its own entry), measured at several concurrencies: its latency is the p50 of one
    request at concurrency 1 (``sources``) and its throughput the images/s at concurrency 32
    (``throughput_sources``) -- records of that same configuration, never a mix of two.
    """

    label: str
    kind: str  # pytorch | onnxruntime | executorch | openvino | aotinductor | served
    sources: tuple[tuple[str, str], ...]
    throughput_sources: tuple[tuple[str, str], ...] = ()


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
    Entry("student ExecuTorch fp32 (XNNPACK)", "executorch", (("runtimes", "ExecuTorch fp32"),)),
    Entry("student ExecuTorch INT8 (XNNPACK)", "executorch", (("runtimes", "ExecuTorch int8"),)),
    Entry("student OpenVINO fp32", "openvino", (("runtimes", "OpenVINO fp32"),)),
    Entry("student OpenVINO INT8 (NNCF)", "openvino", (("runtimes", "OpenVINO int8"),)),
    Entry("student AOTInductor fp32", "aotinductor", (("runtimes", "AOTInductor fp32"),)),
    Entry("student AOTInductor INT8", "aotinductor", (("runtimes", "AOTInductor int8"),)),
    *(Entry(label, "served", ((lesson, f"{config} c1"),), ((lesson, f"{config} c32"),)) for label, lesson, config in (
        ("served: TorchServe", "torchserve", "student"),  # lesson 05: dynamic batching
        ("served: TorchServe, no batching", "torchserve", "student_b1"),
        ("served: TorchServe (lesson 07 run)", "end_to_end", "torchserve"),
        ("served: TorchServe, no batching (lesson 07 run)", "end_to_end", "torchserve, no batching"),
        ("served: custom ASGI server", "end_to_end", "custom server"),
        ("served: custom ASGI server, 2 processes", "end_to_end", "custom server, 2 processes"),
        ("served: serverless function", "end_to_end", "serverless"),
        ("served: LitServe", "end_to_end", "litserve"),
        ("served: Ray Serve, 1 replica", "scale_out", "ray serve, 1 replica(s)"),
    )),
)

# The row lessons 05-08 serve: `deployable.student_onnx` exports the shipped student (models/student.pt) to ONNX.
DEPLOYED = "student ONNX fp32"

COLUMNS = ("variant", "kind", "accuracy", "test images", "p50 ms b1", "p50 ms b32", "images/s", "size MB", "source")


@dataclass(frozen=True)
class Row:
    """One line of the decision table (None: not measured for this variant)."""

    variant: str
    kind: str
    accuracy: float | None  # fraction
    accuracy_images: int | None  # how many test images the accuracy was measured on (None: no accuracy)
    p50_ms_b1: float | None  # one image (a served variant: one request at concurrency 1)
    p50_ms_b32: float | None  # a batch of 32 (not defined for a served variant)
    images_per_s: float | None  # at batch 32, or served at concurrency 32
    size_bytes: int | None
    source: str  # "lesson/variant" of the record(s)
    machine: str | None = None  # the machine it was measured on (:func:`machine_label`); None: the record does not say

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
                "test images": "-" if self.accuracy_images is None else f"{self.accuracy_images:,}",
                "p50 ms b1": num(self.p50_ms_b1, ".2f"), "p50 ms b32": num(self.p50_ms_b32, ".2f"),
                "images/s": num(self.images_per_s, ".0f"),
                "size MB": "-" if self.size_bytes is None else f"{self.size_bytes / 1e6:.2f}", "source": self.source}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_label(hardware: dict[str, Any] | None) -> str | None:
    """The machine a record was measured on, as one label: CPU model, architecture, the ISA PyTorch's
    kernels use and the vector/matrix extensions that decide INT8 and bf16 speed (from
    :func:`deploylab.hardware.hardware_report`). None when there is no hardware report."""
    if not hardware:
        return None
    flags = [f for f, on in (hardware.get("cpu_flags") or {}).items() if on]
    return (f"{hardware.get('cpu', '?')} ({hardware.get('machine', '?')}, {hardware.get('torch_cpu_capability', '?')} kernels"
            + (f"; {', '.join(flags)}" if flags else "") + ")")


def machines(rows: Sequence[Row]) -> list[str | None]:
    """The machines of ``rows``, in the order they first appear."""
    return list(dict.fromkeys(r.machine for r in rows))


def on_machine(rows: Sequence[Row], machine: str | None) -> list[Row]:
    """The rows measured on ``machine`` (a :func:`machine_label`)."""
    return [r for r in rows if r.machine == machine]


def _one_machine(rows: Sequence[Row], what: str) -> None:
    found = machines(rows)
    if len(found) > 1:
        raise ValueError(f"{what} compares rows of one machine; these come from {len(found)}: "
                         + "; ".join(str(m) for m in found) + " -- pick one with decision.on_machine(rows, machine)")


def _index(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["lesson"], r["variant"]): r for r in records}


def _p50(record: dict[str, Any], batch: str) -> float | None:
    return (record.get("latency_ms", {}).get(batch) or {}).get("p50_ms")


def accuracy_images(record: dict[str, Any]) -> int | None:
    """How many test images ``record``'s accuracy was measured on: its ``accuracy_images``, else
    ``parity_images`` (a served lesson's accuracy is over the images it sent through the server), else
    ``test_images``, else the test-set size of its profile. None for a record without an accuracy, or
    with no count and no profile to tell."""
    if record.get("accuracy") is None:
        return None
    for key in ("accuracy_images", "parity_images", "test_images"):
        if record.get(key) is not None:
            return int(record[key])
    if record.get("profile") is None:
        return None
    return get_profile(record["profile"]).test_images or TEST_SET_IMAGES


def build_rows(records: Sequence[dict[str, Any]], catalogue: Sequence[Entry] = CATALOGUE) -> tuple[list[Row], list[str]]:
    """The decision rows present in ``records``, and the labels of the catalogue's variants that are missing
    (with the lesson file that would hold them)."""
    idx = _index(records)
    rows, missing = [], []
    for entry in catalogue:
        present = [k for k in entry.sources if k in idx]
        if not present:
            missing.append(f"{entry.label} (needs {' or '.join(f'{lesson}.json: {v!r}' for lesson, v in entry.sources)})")
            continue
        key = present[0]
        rec = idx[key]
        machine = machine_label(rec.get("hardware"))
        if entry.kind == "served":  # one configuration: concurrency 1 for the latency, 32 for the throughput
            thr_key = next((k for k in entry.throughput_sources if k in idx), None)
            if thr_key is not None and machine_label(idx[thr_key].get("hardware")) != machine:
                thr_key = None  # measured on another machine: not this row's throughput
            thr = idx[thr_key].get("throughput", {}).get("1") if thr_key else None
            rows.append(Row(entry.label, entry.kind, rec.get("accuracy"), accuracy_images(rec), _p50(rec, "1"), None, thr,
                            rec.get("size_bytes"), f"{key[0]}/{key[1]}" + (f" + {thr_key[1]}" if thr_key else ""), machine))
        else:
            rows.append(Row(entry.label, entry.kind, rec.get("accuracy"), accuracy_images(rec), _p50(rec, "1"), _p50(rec, "32"),
                            rec.get("throughput", {}).get("32"), rec.get("size_bytes"), f"{key[0]}/{key[1]}", machine))
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
    """The rows that have accuracy and latency at ``batch_size``, each with its Pareto flag.

    Rows of different machines are never compared: each row's flag says whether it is on the front of
    its own machine's rows."""
    usable = [r for r in rows if r.accuracy is not None and r.latency(batch_size) is not None]
    flag_of: dict[int, bool] = {}
    for machine in machines(usable):
        group = [i for i, r in enumerate(usable) if r.machine == machine]
        flags = pareto_front([(usable[i].latency(batch_size), usable[i].accuracy) for i in group])
        flag_of.update(zip(group, flags))
    return [(r, flag_of[i]) for i, r in enumerate(usable)]


def qualifying(rows: Sequence[Row], *, latency_budget_ms: float, min_accuracy: float, batch_size: int = 1) -> list[Row]:
    """The variants whose p50 latency at ``batch_size`` fits the budget and whose accuracy reaches the
    minimum (a fraction), fastest first. Variants not measured at that batch size, or without an
    accuracy, do not qualify: an unknown is not a yes. The rows must come from one machine
    (:func:`on_machine`): a latency from one CPU does not rank against another CPU's."""
    _one_machine(rows, "qualifying")
    if latency_budget_ms <= 0:
        raise ValueError(f"latency_budget_ms must be > 0, got {latency_budget_ms}")
    if not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy is a fraction in [0, 1], got {min_accuracy}")
    ok = [r for r in rows if r.accuracy is not None and r.accuracy >= min_accuracy
          and r.latency(batch_size) is not None and r.latency(batch_size) <= latency_budget_ms]
    return sorted(ok, key=lambda r: (r.latency(batch_size), -r.accuracy))


def markdown(rows: Sequence[Row]) -> str:
    """A Markdown table of rows (readable units); rows of more than one machine as one table per
    machine, each under the machine's label, so that no column mixes two CPUs."""
    def table(group: Sequence[Row]) -> str:
        out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in group:
            d = r.display()
            out.append("| " + " | ".join(str(d[c]) for c in COLUMNS) + " |")
        return "\n".join(out)

    found = machines(rows)
    if len(found) <= 1:
        return table(rows)
    parts = [f"**{len(found)} machines**: each table holds one machine's rows; the tables do not compare with each other."]
    for machine in found:
        parts += [f"Measured on {machine or 'a machine the records do not name'}:", table(on_machine(rows, machine))]
    return "\n\n".join(parts)
