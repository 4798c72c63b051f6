import json

import pytest

from deploylab import runtimes


def _notebook(path, intro):
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "metadata": {}, "source": intro}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_record_and_time_paragraph_round_trip(tmp_dirs):
    assert "`workshop` not measured yet" in runtimes.time_paragraph("03_distillation")
    entry = runtimes.record("03_distillation", "workshop", 540.0)
    assert entry["seconds"] == 540.0 and entry["cpu"] and entry["isa"]
    text = runtimes.time_paragraph("03_distillation")
    assert "`workshop` 9.0 min" in text and "`full` not measured yet" in text and entry["cpu"] in text
    assert runtimes.read()["workshop"]["03_distillation"]["seconds"] == 540.0


def test_bad_records_are_refused(tmp_dirs):
    with pytest.raises(ValueError, match="profile"):
        runtimes.record("03_distillation", "laptop", 10)
    with pytest.raises(ValueError, match="positive"):
        runtimes.record("03_distillation", "smoke", 0)
    assert runtimes.read() == {}


def test_main_records_and_rewrites_only_the_time_paragraph(tmp_dirs):
    nb = _notebook(tmp_dirs / "01_quantization.ipynb",
                   "# 01 · Title\n\n**Time**: typed by hand, 5 min.\n\n**Needs**: the models.")
    assert runtimes.main([str(nb), "full", "61"]) == 0
    assert runtimes.read()["full"]["01_quantization"]["seconds"] == 61.0
    intro = json.loads(nb.read_text())["cells"][0]["source"]
    assert "typed by hand" not in intro and "`full` 1.0 min" in intro
    assert intro.startswith("# 01 · Title\n\n**Time**") and intro.endswith("\n\n**Needs**: the models.")
    assert runtimes.main(["too", "few"]) == 2


def test_an_intro_without_a_time_paragraph_is_left_alone(tmp_dirs):
    nb = _notebook(tmp_dirs / "09_other.ipynb", "# 09 · Title\n\nNo times here.")
    before = nb.read_text()
    assert runtimes.update_intro(nb) is False and nb.read_text() == before


def _executed(path, banner):
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {}, "source": "print(config.banner())",
                                           "outputs": [{"output_type": "stream", "name": "stdout", "text": banner}]}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_the_readme_says_one_run_only_when_every_banner_agrees(tmp_dirs):
    same = "deploylab profile: workshop\nmachine: Intel Xeon, 2 cores, avx2\n"
    a, b = _executed(tmp_dirs / "00_baseline.ipynb", same), _executed(tmp_dirs / "01_quantization.ipynb", same)
    runtimes.record("00_baseline", "workshop", 90)
    one = runtimes.committed_outputs_paragraph([a, b])
    assert one.startswith("The committed notebook outputs are one `make course PROFILE=workshop` run on Intel Xeon")
    assert "00 1.5 min" in one
    _executed(b, "deploylab profile: full\nmachine: AMD EPYC, 2 cores, avx2\n")
    two = runtimes.committed_outputs_paragraph([a, b])
    assert "more than one run" in two and "01_quantization: `full` on AMD EPYC" in two
    _executed(b, "deploylab profile: workshop\n")  # committed before the banner named the machine
    assert "no machine recorded" in runtimes.committed_outputs_paragraph([a, b])
