from deploylab import runtimes


def test_record_and_summary_round_trip(tmp_dirs):
    assert "not measured yet" in runtimes.summary("03_distillation")
    entry = runtimes.record("03_distillation", "workshop", 540.0)
    assert entry["seconds"] == 540.0 and entry["cpu"] and entry["isa"]
    text = runtimes.summary("03_distillation")
    assert "workshop: 9.0 min" in text and "full: not measured yet" in text
    assert runtimes.read()["workshop"]["03_distillation"]["seconds"] == 540.0


def test_bad_records_are_refused(tmp_dirs):
    import pytest

    with pytest.raises(ValueError, match="profile"):
        runtimes.record("03_distillation", "laptop", 10)
    with pytest.raises(ValueError, match="positive"):
        runtimes.record("03_distillation", "smoke", 0)
    assert runtimes.read() == {}


def test_main_records_from_the_makefile_arguments(tmp_dirs, capsys):
    assert runtimes.main(["notebooks/01_quantization.ipynb", "full", "61"]) == 0
    assert runtimes.read()["full"]["01_quantization"]["seconds"] == 61.0
    assert runtimes.main(["too", "few"]) == 2
