"""Every lesson notebook has the same bones (docs/ARCHITECTURE.md: objectives, technique, measurements, takeaways, exercise).

Checked on the committed .ipynb files, without running them (nbval runs them): an intro stating
what it teaches, the time per profile and what it needs; the banner as the first code cell; the
"Python (deploylab)" kernel; takeaways; an exercise whose self-check calls deploylab.exercises; and,
when committed with outputs, outputs of a workshop or full run without tracebacks.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from deploylab import config

NOTEBOOKS = sorted([*(config.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"), *(config.ROOT / "notebooks").glob("[0-9][0-9][a-z]_*.ipynb")])
PROFILES = ("smoke", "workshop", "full")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _src(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def _headings(cells: list[dict]) -> list[str]:
    return [ln.lstrip("#").strip() for c in cells if c["cell_type"] == "markdown"
            for ln in _src(c).splitlines() if ln.startswith("#")]


def test_there_are_lesson_notebooks():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def nb(request) -> tuple[Path, dict]:
    return request.param, json.loads(request.param.read_text())


def test_intro_says_what_it_teaches_how_long_per_profile_and_what_it_needs(nb):
    path, book = nb
    first = book["cells"][0]
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell must be the markdown intro"
    intro = _src(first)
    number = path.name.split("_", 1)[0]  # "04" or "04b"
    assert re.match(rf"#\s+{number}\b", intro), f"{path.name}: the intro starts with a '# {number} · title' heading"
    assert re.search(r"\*\*You will learn", intro), f"{path.name}: the intro lacks '**You will learn to**' and its list"
    time_part = re.search(r"\*\*Time\*\*|\*\*Time \(", intro)
    assert time_part, f"{path.name}: the intro lacks a '**Time**' paragraph"
    time_text = intro[time_part.start():].split("\n\n")[0]
    missing = [p for p in PROFILES if f"`{p}`" not in time_text]
    assert not missing, f"{path.name}: the '**Time**' paragraph gives no time for {missing}"
    assert re.search(r"\d+\s*(-\s*\d+\s*)?min|minutes", time_text), f"{path.name}: the '**Time**' paragraph states no minutes"
    assert "**Needs**" in intro, f"{path.name}: the intro lacks a '**Needs**' paragraph"


def test_first_code_cell_prints_the_banner(nb):
    path, book = nb
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    assert re.search(r"print\(\s*config\.banner\(", _src(code[0])), f"{path.name}: the first code cell must print config.banner(profile)"


def test_kernelspec_is_deploylab(nb):
    path, book = nb
    ks = book["metadata"].get("kernelspec", {})
    assert ks.get("name") == "deploylab" and ks.get("display_name") == "Python (deploylab)", f"{path.name}: kernelspec {ks}"


def test_takeaways_and_an_exercise_with_a_self_check(nb):
    """Every lesson's exercise is a `deploylab.exercises` entry: its self-check calls the check (tests/test_exercises.py
    proves it can fail), the markdown says how to print the solution, and no solution cell overwrites the answer."""
    from deploylab import exercises

    path, book = nb
    cells = book["cells"]
    heads = _headings(cells)
    assert any(h.lower().startswith("takeaways") for h in heads), f"{path.name}: no '## Takeaways' section"
    ex = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
          and any(ln.startswith("#") and "exercise" in ln.lower() for ln in _src(c).splitlines())]
    assert ex, f"{path.name}: no '## Exercise' section"
    after = cells[ex[0] + 1:]
    checks = [c for c in after if c["cell_type"] == "code" and _src(c).lstrip().lower().startswith("# self-check")]
    assert checks, f"{path.name}: the exercise has no '# Self-check' cell"
    registered = [name for name in exercises.MODULES if exercises.get(name).lesson == path.stem]
    assert len(registered) == 1, f"{path.name}: its exercise needs one entry in deploylab.exercises.MODULES, found {registered}"
    assert any(f'exercises.check("{registered[0]}"' in _src(c) for c in checks), \
        f"{path.name}: the self-check must call exercises.check({registered[0]!r}, ...)"
    assert any(f'exercises.show_solution("{registered[0]}")' in _src(c) for c in cells if c["cell_type"] == "markdown"), \
        f"{path.name}: the exercise must say how to print its solution"
    solutions = [c for c in after if c["cell_type"] == "code"
                 and (_src(c).lstrip().lower().startswith("# solution") or c.get("metadata", {}).get("jupyter", {}).get("source_hidden"))]
    assert not solutions, f"{path.name}: a solution code cell would overwrite the learner's answer"


def test_committed_outputs_are_not_smoke_runs_and_hold_no_traceback(nb):
    path, book = nb
    errors = [i for i, c in enumerate(book["cells"]) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed with error outputs in cells {errors}"
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    printed = "".join("".join(o.get("text", "")) for o in code[0].get("outputs", []))
    assert "profile: smoke" not in printed, f"{path.name}: committed with the outputs of a smoke run"


def test_migration_notes_point_at_headings_that_exist():
    """docs/MIGRATION.md links each old call to a notebook section: every such section must exist."""
    doc = config.ROOT / "docs" / "MIGRATION.md"
    if not doc.is_file():
        pytest.fail("docs/MIGRATION.md is missing")
    links = re.findall(r"\[`(\d\d[a-z]?_\w+)` § ([^\]]+)\]\(\.\./notebooks/(\d\d[a-z]?_\w+)\.ipynb\)", doc.read_text())
    assert len(links) >= 8, f"expected the migration table's links, found {len(links)}"
    missing = []
    for stem, heading, target in links:
        path = config.ROOT / "notebooks" / f"{target}.ipynb"
        if stem != target or not path.is_file() or heading.strip() not in _headings(_cells(path)):
            missing.append(f"{target}: {heading}")
    assert not missing, f"docs/MIGRATION.md names sections that are not in the notebooks: {missing}"


# What a committed output must not show: the author's machine (temporary folders the kit or its libraries
# make, home and work folders, the virtual environment), raw terminal colour codes, the ONNX exporter's
# progress lines. Paths inside a container (a Dockerfile's /tmp/wheels, /home/serve) are content, not leaks.
TEMP = tempfile.gettempdir()  # this machine's folders, read from it: no path of the author's machine is written here
LEAKS = {
    "a temporary folder of this machine": re.compile(re.escape(TEMP) + r"/(?:tmp|deploylab|ray|pytest|nbval|torchinductor)[\w.-]*"),
    "a home or repository folder of this machine": re.compile(f"{re.escape(str(Path.home()))}/|{re.escape(str(config.ROOT))}/"),
    "the virtual environment's path": re.compile(r"\.venv/"),
    "a raw terminal colour code": re.compile(r"\x1b\["),
    "the ONNX exporter's progress lines": re.compile(r"\[torch\.onnx\]"),
}


def _printed(cell: dict) -> str:
    """Everything a code cell's committed outputs show as text (streams, text/* data, tracebacks)."""
    out = []
    for o in cell.get("outputs", []):
        for key in ("text", "traceback"):
            value = o.get(key, "")
            out.append("".join(value) if isinstance(value, list) else value)
        for mime, value in o.get("data", {}).items():
            if mime.startswith("text/"):
                out.append("".join(value) if isinstance(value, list) else value)
    return "\n".join(out)


def output_leaks(book: dict) -> list[str]:
    """Each leak in the committed outputs: cell index, what leaked, the line (shortened)."""
    found = []
    for i, cell in enumerate(book["cells"]):
        for line in _printed(cell).splitlines():
            for what, pattern in LEAKS.items():
                if pattern.search(line):
                    found.append(f"cell {i}: {what}: {line[:120]!r}")
    return found


def test_output_leak_check_catches_each_kind_and_passes_container_paths():
    """The check below can fail: one planted line per kind is caught; a Dockerfile's container paths are not."""
    planted = [f"refused {TEMP}/deploylab-04-okyj152b/student.onnx", f"working folder {TEMP}/tmpab12cd34",
               f"Ray stopped; processes left under {TEMP}/ray-dl-wi2qe5sq", f"see {Path.home()}/.cache/x", f"{config.ROOT}/models",
               ".venv/lib/python3.11/site-packages/torch", "\x1b[33m(raylet)\x1b[0m died", "[torch.onnx] Run decompositions..."]
    for line in planted:
        book = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "stream", "text": [line]}]}]}
        assert output_leaks(book), line
    clean = ["COPY docker/wheels/ /tmp/wheels/", "WORKDIR /home/serve/run", "pid /tmp/nginx.pid;"]
    book = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "stream", "text": "\n".join(clean)}]}]}
    assert output_leaks(book) == []


def test_committed_outputs_show_no_machine_paths_colour_codes_or_exporter_chatter(nb):
    path, book = nb
    leaks = output_leaks(book)
    assert not leaks, f"{path.name}: " + "; ".join(leaks[:5]) + (f" (+{len(leaks) - 5} more)" if len(leaks) > 5 else "")


def _banner(book: dict) -> tuple[str, ...]:
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    return tuple(_printed(code[0]).splitlines()[:2]) if code else ()


def test_committed_notebooks_are_one_run_on_one_machine():
    """Issue 34: the outputs readers see come from one `make course` run: one profile, one machine (the banner's lines)."""
    banners = {p.name: _banner(json.loads(p.read_text())) for p in NOTEBOOKS}
    banners = {name: b for name, b in banners.items() if b}
    unnamed = [n for n, b in banners.items() if len(b) < 2 or not b[1].startswith("machine: ")]
    assert not unnamed, f"committed before the banner named the machine: {unnamed}"
    kinds = {b: [n for n, x in banners.items() if x == b] for b in set(banners.values())}
    assert len(kinds) == 1, "committed outputs from more than one run or machine: " + "; ".join(
        f"{' / '.join(b)}: {', '.join(names)}" for b, names in kinds.items())
