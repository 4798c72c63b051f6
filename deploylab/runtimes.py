"""How long each lesson took at the last ``make course`` run, per profile: the intros' "Time" line.

``make course`` times each notebook it executes and records it here (``python -m
deploylab.runtimes NOTEBOOK PROFILE SECONDS``) in results/run_times.json, with the CPU it ran on;
the first cell of a lesson prints :func:`summary`, so no intro carries a typed time.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from . import config
from .files import atomic_write_json
from .hardware import hardware_report

PROFILE_ORDER = ("smoke", "workshop", "full")


def times_path() -> Path:
    """results/run_times.json: one entry per profile and lesson."""
    return config.RESULTS_DIR / "run_times.json"


def read() -> dict[str, dict[str, Any]]:
    """``{profile: {lesson: entry}}``; empty when nothing was recorded yet."""
    path = times_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def record(lesson: str, profile: str, seconds: float) -> dict[str, Any]:
    """Record one run of ``lesson`` (a notebook stem such as ``03_distillation``) in ``profile``."""
    if profile not in PROFILE_ORDER:
        raise ValueError(f"unknown profile {profile!r}; one of {', '.join(PROFILE_ORDER)}")
    if not seconds > 0:
        raise ValueError(f"a run takes a positive time, got {seconds}")
    hw = hardware_report()
    isa = ", ".join(f for f, on in hw["cpu_flags"].items() if on)
    entry = {"seconds": round(float(seconds), 1), "date": dt.date.today().isoformat(),
             "cpu": hw["cpu"], "cores": hw.get("usable_cores"), "isa": isa or "baseline x86-64"}
    times = read()
    times.setdefault(profile, {})[lesson] = entry
    atomic_write_json(times_path(), times)
    return entry


def summary(lesson: str) -> str:
    """One line per profile: the lesson's last measured run time, where and when it was measured."""
    times = read()
    lines = []
    for profile in PROFILE_ORDER:
        e = times.get(profile, {}).get(lesson)
        if e is None:
            lines.append(f"  {profile}: not measured yet (make course PROFILE={profile})")
        else:
            lines.append(f"  {profile}: {e['seconds'] / 60:.1f} min on {e['cores']} cores of {e['cpu']} "
                         f"({e['isa']}), {e['date']}")
    return "time of this lesson at the last `make course` run:\n" + "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m deploylab.runtimes NOTEBOOK PROFILE SECONDS`` (called by ``make course``)."""
    if len(argv) != 3:
        print("usage: python -m deploylab.runtimes NOTEBOOK PROFILE SECONDS", file=sys.stderr)
        return 2
    entry = record(Path(argv[0]).stem, argv[1], float(argv[2]))
    print(f"{Path(argv[0]).stem} ({argv[1]}): {entry['seconds'] / 60:.1f} min recorded in {times_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
