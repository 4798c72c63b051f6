import json

import pytest

from deploylab import bench, config, report, results

HW = {"cpu": "Test CPU", "torch_threads": 2, "versions": {"torch": "x"}}


def record(variant, acc=0.9, lesson="baseline"):
    lat = {b: bench.latency_percentiles([1.0, 3.0], b) for b in (1, 32)}
    return results.make_record(lesson=lesson, variant=variant, model="m", runtime="pytorch", precision="fp32",
                               accuracy=acc, latency=lat, size_bytes=2_000_000, profile=config.PROFILES["smoke"], hardware=HW)


def test_record_has_the_design_fields():
    r = record("teacher")
    for key in ("lesson", "variant", "model", "runtime", "precision", "accuracy", "latency_ms", "throughput",
                "size_bytes", "profile", "hardware", "versions", "date"):
        assert key in r
    assert r["latency_ms"]["32"]["p50_ms"] == 2.0 and r["throughput"]["32"] == pytest.approx(16_000)
    with pytest.raises(ValueError, match="fraction"):
        record("x", acc=93.1)  # a percentage is a mistake


def test_write_read_and_table(tmp_dirs):
    path = results.write_results("baseline", [record("teacher"), record("student", 0.8)], "smoke")
    assert path == tmp_dirs / "results" / "smoke" / "baseline.json"
    back = results.read_results("smoke")
    assert [r["variant"] for r in back] == ["teacher", "student"]
    assert json.loads(path.read_text())[1]["accuracy"] == 0.8
    table = results.records_table(back)
    assert "| baseline | student | pytorch | fp32 | 80.00% | 2.00 |" in table
    assert results.THROUGHPUT_B32 in table.splitlines()[0] and table.endswith("not a server's throughput under load.")
    with pytest.raises(ValueError, match="lesson='other'"):
        results.write_results("other", [record("t")], "smoke")


def test_readme_table_is_generated_between_markers(tmp_dirs):
    readme = tmp_dirs / "README.md"
    readme.write_text(f"# title\n{report.START}\nold\n{report.END}\ntail\n")
    report.update_readme(config.PROFILES["smoke"], readme)
    assert "No `smoke` results yet" in readme.read_text()
    results.write_results("baseline", [record("teacher")], "smoke")
    report.update_readme(config.PROFILES["smoke"], readme)
    text = readme.read_text()
    assert "| teacher fp32 (ResNet50) | pytorch | 90.00% | 512 |" in text and "old" not in text and text.endswith("tail\n")
    assert (tmp_dirs / "results" / "smoke" / "accuracy_vs_latency.png").stat().st_size > 1000
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(config.PROFILES["smoke"], readme)
