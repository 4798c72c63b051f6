"""Result records: one JSON file per lesson and profile under ``results/<profile>/``.

A record describes one variant measured in one lesson: lesson, variant, model,
runtime, precision, accuracy, latency (per batch size), throughput, size, profile, hardware,
versions, date. Reports and the README's headline table are generated from these files only.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import config
from .bench import LatencyStats
from .config import Profile
from .files import atomic_write_json
from .hardware import hardware_report
from .tables import markdown_table


def make_record(
    *,
    lesson: str,
    variant: str,
    model: str,
    runtime: str,
    precision: str,
    accuracy: float | None,
    latency: Mapping[int, LatencyStats],
    size_bytes: int | None,
    profile: Profile,
    hardware: dict | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result record; ``extra`` holds lesson-specific fields (parameters, MACs, test images...)."""
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy is a fraction in [0, 1], got {accuracy}")
    hw = hardware or hardware_report()
    return {
        "lesson": lesson,
        "variant": variant,
        "model": model,
        "runtime": runtime,
        "precision": precision,
        "accuracy": accuracy,
        "latency_ms": {str(b): {k: v for k, v in s.to_dict().items() if k.endswith("_ms") or k == "n"} for b, s in latency.items()},
        "throughput": {str(b): s.throughput for b, s in latency.items()},
        "size_bytes": size_bytes,
        "profile": profile.name,
        "hardware": {k: v for k, v in hw.items() if k != "versions"},
        "versions": hw["versions"],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def results_path(lesson: str, profile: Profile | str | None = None) -> Path:
    return config.results_dir(profile) / f"{lesson}.json"


def write_results(lesson: str, records: list[dict[str, Any]], profile: Profile | str | None = None) -> Path:
    """Write (replace) the records of ``lesson`` for ``profile`` atomically."""
    if not records:
        raise ValueError(f"no records to write for lesson {lesson!r}")
    if any(r["lesson"] != lesson for r in records):
        raise ValueError(f"every record written to {lesson}.json must have lesson={lesson!r}")
    return atomic_write_json(results_path(lesson, profile), records)


def read_results(profile: Profile | str | None = None) -> list[dict[str, Any]]:
    """All records of ``profile``, lesson files in name order."""
    folder = config.results_dir(profile)
    records: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        records.extend(json.loads(path.read_text()))
    return records


THROUGHPUT_B32 = "images/s (b32, batch / mean)"


def records_table(records: list[dict[str, Any]]) -> str:
    """Markdown table: accuracy, latency p50/p99 at batch 1 and 32, throughput at 32 (defined below the table), size."""
    def lat(r: dict, b: str, k: str) -> str:
        v = r["latency_ms"].get(b, {}).get(k)
        return f"{v:.2f}" if v is not None else "-"

    rows = []
    for r in records:
        thr = r["throughput"].get("32")
        rows.append({
            "lesson": r["lesson"], "variant": r["variant"], "runtime": r["runtime"], "precision": r["precision"],
            "accuracy": f"{100 * r['accuracy']:.2f}%" if r.get("accuracy") is not None else "-",
            "p50 ms (b1)": lat(r, "1", "p50_ms"), "p99 ms (b1)": lat(r, "1", "p99_ms"),
            "p50 ms (b32)": lat(r, "32", "p50_ms"), "p99 ms (b32)": lat(r, "32", "p99_ms"),
            THROUGHPUT_B32: f"{thr:.0f}" if thr else "-",
            "size MB": f"{r['size_bytes'] / 1e6:.1f}" if r.get("size_bytes") else "-",
        })
    note = (f"*{THROUGHPUT_B32}*: 32 divided by the mean latency at batch 32 -- one caller running batches back to back, "
            "not a server's throughput under load.")
    return f"{markdown_table(rows)}\n\n{note}"
