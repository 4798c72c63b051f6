"""How long each lesson took at the last ``make course`` run, per profile: the intros' "Time" line.

``make course`` times each notebook it executes and records it (``python -m deploylab.runtimes
NOTEBOOK PROFILE SECONDS``) in results/run_times.json, with the CPU it ran on, then rewrites the
notebook's "**Time**" paragraph from what is recorded (:func:`update_intro`): no intro carries a
typed time, and each says where and when its times were measured.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Any

from . import config
from .files import atomic_path, atomic_write_json
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


def time_paragraph(lesson: str) -> str:
    """The intro's "**Time**" paragraph of ``lesson``, from results/run_times.json."""
    times = read()
    parts, machines = [], set()
    for profile in PROFILE_ORDER:
        e = times.get(profile, {}).get(lesson)
        if e is None:
            parts.append(f"`{profile}` not measured yet (`make course PROFILE={profile}`)")
        else:
            parts.append(f"`{profile}` {e['seconds'] / 60:.1f} min ({e['date']})")
            machines.add(f"{e['cores']} cores of {e['cpu']} ({e['isa']})")
    where = f", on {'; '.join(sorted(machines))}" if machines else ""
    return ("**Time** (measured by the last `make course` run of each profile, written here by it): "
            + ", ".join(parts) + where + ".")


def update_intro(notebook: str | Path) -> bool:
    """Replace the "**Time**" paragraph of ``notebook``'s first cell with :func:`time_paragraph`.

    Only the paragraph changes (up to the next blank line); the notebook is written atomically.
    Returns False, changing nothing, when the intro has no such paragraph.
    """
    path = Path(notebook)
    book = json.loads(path.read_text())
    intro = book["cells"][0]
    source = "".join(intro["source"]) if isinstance(intro["source"], list) else intro["source"]
    match = re.search(r"\*\*Time\*\*.*?(?=\n\n|\Z)", source, re.S)
    if match is None:
        return False
    intro["source"] = source[: match.start()] + time_paragraph(path.stem) + source[match.end():]
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(book, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return True


def main(argv: list[str]) -> int:
    """``python -m deploylab.runtimes NOTEBOOK PROFILE SECONDS`` (called by ``make course``): record, then update the intro.

    ``python -m deploylab.runtimes --intro NOTEBOOK`` only rewrites the intro from what is recorded.
    """
    if len(argv) == 2 and argv[0] == "--intro":
        return 0 if update_intro(argv[1]) else 1
    if len(argv) != 3:
        print("usage: python -m deploylab.runtimes NOTEBOOK PROFILE SECONDS | --intro NOTEBOOK", file=sys.stderr)
        return 2
    entry = record(Path(argv[0]).stem, argv[1], float(argv[2]))
    print(f"{Path(argv[0]).stem} ({argv[1]}): {entry['seconds'] / 60:.1f} min recorded in {times_path()}")
    if not update_intro(argv[0]):
        print(f"{argv[0]}: no '**Time**' paragraph in the intro to update", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
