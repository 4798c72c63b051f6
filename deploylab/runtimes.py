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


README_START, README_END = "<!-- outputs:start -->", "<!-- outputs:end -->"


def _banner_lines(path: Path) -> tuple[str, str] | None:
    """The committed notebook's banner (``deploylab profile: ...``, ``machine: ...``), or None when it has none."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    text = "".join("".join(o.get("text", "")) for o in (cells[0].get("outputs", []) if cells else []))
    lines = text.splitlines()
    if len(lines) < 2 or not lines[1].startswith("machine: "):
        return None
    return lines[0].removeprefix("deploylab profile: "), lines[1].removeprefix("machine: ")


def committed_outputs_paragraph(notebooks: list[Path] | None = None) -> str:
    """Which run the committed notebooks' outputs come from, read from their banners and run_times.json.

    One run on one machine gives one sentence with each lesson's time; anything else says which
    notebooks came from which profile and machine (the README never claims one run that is not).
    """
    notebooks = notebooks or sorted(config.ROOT.glob("notebooks/[0-9][0-9]*_*.ipynb"))
    runs: dict[tuple[str, str] | None, list[str]] = {}
    for nb in notebooks:
        runs.setdefault(_banner_lines(nb), []).append(nb.stem)
    if len(runs) == 1 and None not in runs:
        (profile, machine), = runs
        times = read().get(profile, {})
        took = ", ".join(f"{stem[:3].rstrip('_')} {times[stem]['seconds'] / 60:.1f} min" for stem in runs[(profile, machine)]
                         if stem in times)
        return (f"The committed notebook outputs are one `make course PROFILE={profile}` run on {machine}"
                + (f" (lesson times: {took})" if took else "") + ".")
    parts = [f"{', '.join(stems)}: " + ("no machine recorded" if run is None else f"`{run[0]}` on {run[1]}")
             for run, stems in runs.items()]
    return "The committed notebook outputs come from more than one run: " + "; ".join(parts) + "."


def update_readme(readme: Path | None = None) -> bool:
    """Rewrite the README's paragraph between the outputs markers; False (nothing changed) without markers."""
    readme = readme or config.ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    body = f"{README_START}{committed_outputs_paragraph()}{README_END}"
    new = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda _: body, text, flags=re.S)
    with atomic_path(readme) as tmp:
        Path(tmp).write_text(new)
    return True


def main(argv: list[str]) -> int:
    """``python -m deploylab.runtimes NOTEBOOK PROFILE SECONDS`` (called by ``make course``): record, then update the intro.

    ``python -m deploylab.runtimes --intro NOTEBOOK`` only rewrites the intro from what is recorded;
    ``python -m deploylab.runtimes --readme`` rewrites the README's sentence on which run the outputs come from.
    """
    if len(argv) == 2 and argv[0] == "--intro":
        return 0 if update_intro(argv[1]) else 1
    if argv == ["--readme"]:
        return 0 if update_readme() else 1
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
