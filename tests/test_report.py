"""The README's results section: the decision table of a profile's records, its missing variants, the
warning on accuracies measured on fewer images, the plot, and the markers of update_readme."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from deploylab import config, decision, report

# Five real records of a workshop run (results/workshop/, copied): the teacher and the student of lesson
# 00, the student's ONNX fp32 of lesson 04, and TorchServe at concurrency 1 and 32 of lesson 05.
FIXTURE = Path(__file__).parent / "fixtures" / "workshop_records.json"
WORKSHOP = config.PROFILES["workshop"]


def _write(folder: Path, records: list[dict]) -> None:
    """Write ``records`` as results/<profile>/<lesson>.json files, one per lesson, as the lessons do."""
    folder.mkdir(parents=True, exist_ok=True)
    for lesson in dict.fromkeys(r["lesson"] for r in records):
        (folder / f"{lesson}.json").write_text(json.dumps([r for r in records if r["lesson"] == lesson]))


@pytest.fixture
def records(tmp_dirs):
    """The fixture's records, in results/workshop/ under the temporary RESULTS_DIR; served parity 500 images."""
    recs = json.loads(FIXTURE.read_text())
    for r in recs:
        if r["lesson"] == "torchserve":
            r["parity_images"] = 500
    _write(config.results_dir(WORKSHOP), recs)
    return recs


def _table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_render_is_the_decision_table_with_missing_variants_and_warning(records):
    assert config.results_dir(WORKSHOP) != config.ROOT / "results" / "workshop"  # the temporary folder
    text = report.render(WORKSHOP)
    table = _table(text)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == list(decision.COLUMNS) and "test images" in header
    body = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[2:]}
    # one row per catalogue variant present: not one per record (five records, four variants)
    assert list(body) == ["teacher fp32 (ResNet50)", "student fp32, from scratch", "student ONNX fp32", "served: TorchServe"]
    images = header.index("test images")
    assert body["teacher fp32 (ResNet50)"][images] == "10,000"
    assert body["served: TorchServe"][images] == "500"
    assert body["served: TorchServe"][header.index("p50 ms b32")] == "-"
    assert body["served: TorchServe"][header.index("source")] == "torchserve/student c1 + student c32"
    assert body["student ONNX fp32"][header.index("accuracy")] == "90.44%"
    # the missing variants, named with the record that would hold them
    missing = next(line for line in text.splitlines() if line.startswith("Missing from `results/workshop/`"))
    assert f"({len(decision.CATALOGUE) - 4} of {len(decision.CATALOGUE)} variants)" in missing
    assert "student INT8 QAT (needs quantization.json: 'student int8 QAT')" in missing
    assert "teacher fp32 (ResNet50)" not in missing
    # the warning names the 500-image row and only it
    warning = next(line for line in text.splitlines() if line.startswith("**Warning"))
    assert "served: TorchServe: 500 images" in warning and "10,000-image" in warning
    assert "teacher fp32" not in warning and "student ONNX fp32" not in warning
    # the deployable row, the latency semantics, the machine and the plot
    assert f"The deployable student is the row `{decision.DEPLOYED}`" in text
    assert "one request at concurrency 1" in text and "32 concurrent clients" in text
    assert "AMD EPYC (x86_64, AVX2 kernels), 2 cores, 2 PyTorch threads, CPU extensions: avx2, fma" in text
    assert "![accuracy vs latency](results/workshop/accuracy_vs_latency.png)" in text
    assert (config.results_dir(WORKSHOP) / "accuracy_vs_latency.png").stat().st_size > 1000


def test_no_warning_when_every_accuracy_is_on_the_whole_test_set(records):
    for r in records:
        r.pop("parity_images", None)
        r.pop("test_images", None)  # the workshop profile's size: the whole test set
    _write(config.results_dir(WORKSHOP), records)
    text = report.render(WORKSHOP)
    assert "Warning" not in text
    assert all(line.count("| 10,000 |") == 1 for line in _table(text)[2:])


def test_warning_names_unknown_counts_and_every_odd_row():
    base = decision.Row("a", "pytorch", 0.9, 10_000, 1.0, 2.0, 100.0, 1, "x/a")
    rows = [base, decision.Row(**{**base.to_dict(), "variant": "b", "accuracy_images": 2000}),
            decision.Row(**{**base.to_dict(), "variant": "c", "accuracy_images": None}),
            decision.Row(**{**base.to_dict(), "variant": "d", "accuracy": None, "accuracy_images": None})]
    warning = report.images_warning(rows)
    assert "b: 2,000 images" in warning and "c: an unknown number of images" in warning
    assert "a:" not in warning and "d:" not in warning  # d has no accuracy to compare
    assert report.images_warning([base]) is None


def test_hardware_line_names_each_machine(records):
    other = copy.deepcopy(records[-1])
    other["hardware"]["cpu"] = "Intel Xeon"
    line = report.hardware_line(records[:-1] + [other])
    assert line.startswith("measured on more than one machine")
    assert "Intel Xeon (x86_64, AVX2 kernels)" in line and "(lessons torchserve)" in line
    assert report.hardware_line(records).startswith("measured on one machine: AMD EPYC")


def test_update_readme_replaces_only_the_marked_part(records, tmp_path):
    readme = tmp_path / "README.md"
    head, tail = "# title\n\nintro text\n", "\n\n## Layout\nmore text\n"
    readme.write_text(f"{head}{report.START}\nold table\n{report.END}{tail}")
    assert report.update_readme(WORKSHOP, readme) == readme
    text = readme.read_text()
    assert text == f"{head}{report.START}\n{report.render(WORKSHOP)}\n{report.END}{tail}"
    assert "old table" not in text and "| served: TorchServe | served |" in text


@pytest.mark.parametrize("content", ["no markers at all\n", f"only the start {report.START}\n"])
def test_update_readme_without_markers_raises(tmp_dirs, content):
    readme = tmp_dirs / "README.md"
    readme.write_text(content)
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(WORKSHOP, readme)
    assert readme.read_text() == content  # left as it was


def test_records_from_two_machines_get_one_table_each_never_one_mixed_table(records, tmp_dirs):
    """A latency measured on one CPU never sits in a column beside another CPU's: one labelled table per machine."""
    moved = copy.deepcopy(records)
    for r in moved:
        if r["lesson"] == "torchserve":
            r["hardware"]["cpu"] = "Intel Xeon"
    _write(config.results_dir(WORKSHOP), moved)
    text = report.render(WORKSHOP)
    assert "more than one machine" in text
    tables = [block for block in text.split("Measured on ")[1:]]
    assert len(tables) == 2
    first, second = (_table(t) for t in tables)
    assert any("served: TorchServe" in line for line in second) and not any("served: TorchServe" in line for line in first)
    assert tables[1].startswith("Intel Xeon")
    assert "![accuracy vs latency]" not in text  # one plot would mix the machines again
