"""Decision table: records -> rows, missing variants, Pareto front, the qualifying filter, the widget."""

from __future__ import annotations

import json

import pytest

from deploylab import config, decision


def _rec(lesson, variant, acc, b1=None, b32=None, thr32=None, size=1_000_000, thr1=None):
    lat = {}
    if b1 is not None:
        lat["1"] = {"p50_ms": b1, "p99_ms": 2 * b1}
    if b32 is not None:
        lat["32"] = {"p50_ms": b32, "p99_ms": 2 * b32}
    thr = {}
    if thr32 is not None:
        thr["32"] = thr32
    if thr1 is not None:
        thr["1"] = thr1
    return {"lesson": lesson, "variant": variant, "accuracy": acc, "latency_ms": lat, "throughput": thr, "size_bytes": size}


RECORDS = [
    _rec("baseline", "teacher", 0.93, b1=10.0, b32=50.0, thr32=640.0, size=94_000_000),
    _rec("baseline", "student", 0.90, b1=4.0, b32=13.0, thr32=2400.0),
    _rec("distillation", "student_distilled", 0.91, b1=4.0, b32=13.0, thr32=2400.0),
    _rec("onnx", "student ort fp32", 0.90, b1=0.5, b32=4.7, thr32=6800.0),
    _rec("onnx", "student ort int8", 0.89, b1=0.4, b32=10.0, thr32=3200.0),
    _rec("torchserve", "student c1", 0.90, b1=12.0, thr1=80.0),
    _rec("torchserve", "student c32", 0.90, b1=60.0, thr1=500.0),
]


def test_rows_from_records_and_missing_variants_named():
    rows, missing = decision.build_rows(RECORDS)
    by = {r.variant: r for r in rows}
    assert by["teacher fp32 (ResNet50)"].p50_ms_b32 == 50.0 and by["teacher fp32 (ResNet50)"].images_per_s == 640.0
    # scratch student falls back to the baseline record when lesson 03 is absent
    assert by["student fp32, from scratch"].source == "baseline/student"
    served = by["served: TorchServe"]
    assert served.p50_ms_b1 == 12.0 and served.p50_ms_b32 is None and served.images_per_s == 500.0
    assert any(m.startswith("student INT8 QAT") and "quantization.json" in m for m in missing)
    assert not any(m.startswith("student ONNX fp32") for m in missing)
    assert len(rows) + len(missing) == len(decision.CATALOGUE)


def test_each_served_row_is_one_configuration():
    """TorchServe without batching answers one request faster, with batching it serves more under load: each
    configuration is its own row, its latency (concurrency 1) and throughput (concurrency 32) both its own --
    never the no-batching p50 beside the batching images/s."""
    recs = [_rec("torchserve", "student c1", 0.90, b1=14.0, thr1=70.0), _rec("torchserve", "student c32", 0.90, b1=50.0, thr1=550.0),
            _rec("torchserve", "student_b1 c1", 0.90, b1=3.0, thr1=260.0), _rec("torchserve", "student_b1 c32", 0.90, b1=65.0, thr1=440.0)]
    by = {r.variant: r for r in decision.build_rows(recs)[0]}
    assert (by["served: TorchServe"].p50_ms_b1, by["served: TorchServe"].images_per_s) == (14.0, 550.0)
    assert by["served: TorchServe"].source == "torchserve/student c1 + student c32"
    b1 = by["served: TorchServe, no batching"]
    assert (b1.p50_ms_b1, b1.images_per_s, b1.source) == (3.0, 440.0, "torchserve/student_b1 c1 + student_b1 c32")
    only_batched = {r.variant: r for r in decision.build_rows(recs[:2])[0]}
    assert "served: TorchServe, no batching" not in only_batched
    # every served entry reads concurrency 1 and 32 of one configuration: the same name before " c1" / " c32"
    for e in decision.CATALOGUE:
        if e.kind == "served":
            assert [v.rsplit(" c", 1)[0] for _, v in e.sources] == [v.rsplit(" c", 1)[0] for _, v in e.throughput_sources]


def _on(rec, cpu, isa="AVX2"):
    return {**rec, "hardware": {"cpu": cpu, "machine": "x86_64", "torch_cpu_capability": isa, "cpu_flags": {"avx2": True}}}


def test_rows_carry_their_machine_and_are_never_compared_across_machines():
    recs = [_on(r, "EPYC") if r["lesson"] == "onnx" else _on(r, "Xeon", "AVX512") for r in RECORDS]
    rows, _ = decision.build_rows(recs)
    by = {r.variant: r for r in rows}
    assert by["student ONNX fp32"].machine == "EPYC (x86_64, AVX2 kernels; avx2)"
    assert by["teacher fp32 (ResNet50)"].machine == "Xeon (x86_64, AVX512 kernels; avx2)"
    assert decision.machines(rows) == ["Xeon (x86_64, AVX512 kernels; avx2)", "EPYC (x86_64, AVX2 kernels; avx2)"]
    # the table: one per machine, each labelled
    md = decision.markdown(rows)
    assert md.startswith("**2 machines**") and "Measured on EPYC (x86_64, AVX2 kernels; avx2):" in md
    assert md.count("| variant |") == 2
    epyc_part = md.split("Measured on EPYC")[1]
    assert "student ONNX INT8" in epyc_part and "teacher fp32" not in epyc_part
    # the filter refuses to rank two machines' latencies; per machine it works
    with pytest.raises(ValueError, match="one machine"):
        decision.qualifying(rows, latency_budget_ms=5.0, min_accuracy=0.0)
    epyc = decision.on_machine(rows, "EPYC (x86_64, AVX2 kernels; avx2)")
    assert [r.variant for r in decision.qualifying(epyc, latency_budget_ms=5.0, min_accuracy=0.0)] == \
        ["student ONNX INT8", "student ONNX fp32"]
    # the Pareto front of each machine on its own: the ONNX rows would dominate the Xeon's, but they are not compared
    flags = {r.variant: on for r, on in decision.pareto_rows(rows, 1)}
    assert flags["teacher fp32 (ResNet50)"] and flags["student distilled"]
    # a served row never takes its throughput from another machine's record
    served = [_on(_rec("torchserve", "student c1", 0.9, b1=10.0, thr1=90.0), "Xeon"),
              _on(_rec("torchserve", "student c32", 0.9, b1=50.0, thr1=600.0), "EPYC")]
    row = {r.variant: r for r in decision.build_rows(served)[0]}["served: TorchServe"]
    assert row.images_per_s is None and row.source == "torchserve/student c1"
    assert decision.machine_label(None) is None and decision.build_rows(RECORDS)[0][0].machine is None


def test_accuracy_images_from_the_record_or_its_profile():
    served = {**_rec("torchserve", "student c1", 0.90, b1=12.0, thr1=80.0), "parity_images": 500, "profile": "workshop"}
    full = {**_rec("baseline", "teacher", 0.93, b1=10.0, b32=50.0, thr32=640.0), "profile": "full"}  # no count
    no_acc = {**_rec("onnx", "student ort fp32", None, b1=0.5, b32=4.7, thr32=6800.0), "profile": "full", "test_images": 10_000}
    rows, _ = decision.build_rows([served, full, no_acc])
    by = {r.variant: r for r in rows}
    assert by["served: TorchServe"].accuracy_images == 500
    assert by["teacher fp32 (ResNet50)"].accuracy_images == 10_000 == decision.TEST_SET_IMAGES
    assert by["student ONNX fp32"].accuracy_images is None
    assert by["served: TorchServe"].display()["test images"] == "500"
    assert by["teacher fp32 (ResNet50)"].display()["test images"] == "10,000"
    assert by["student ONNX fp32"].display()["test images"] == "-"
    # the order: accuracy_images, parity_images, test_images, then the profile's size (smoke: 512)
    rec = {"accuracy": 0.5, "profile": "smoke"}
    assert decision.accuracy_images(rec) == config.PROFILES["smoke"].test_images == 512
    assert decision.accuracy_images({**rec, "test_images": 2000}) == 2000
    assert decision.accuracy_images({**rec, "test_images": 2000, "parity_images": 300}) == 300
    assert decision.accuracy_images({**rec, "test_images": 2000, "parity_images": 300, "accuracy_images": 7}) == 7
    assert decision.accuracy_images({"accuracy": 0.5}) is None  # no count and no profile: unknown
    assert "test images" in decision.COLUMNS and decision.DEPLOYED in {e.label for e in decision.CATALOGUE}


def test_pareto_front_simple_cases():
    # (latency, accuracy): lower latency and higher accuracy win
    pts = [(1.0, 0.80), (2.0, 0.90), (3.0, 0.85), (0.5, 0.70), (2.0, 0.90)]
    assert decision.pareto_front(pts) == [True, True, False, True, True]  # (3, .85) is dominated by (2, .90)
    assert decision.pareto_front([(1.0, 0.5)]) == [True]
    assert decision.pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [False, True]
    with pytest.raises(ValueError):
        decision.pareto_front([(float("nan"), 0.5)])


def test_pareto_rows_on_records():
    rows, _ = decision.build_rows(RECORDS)
    flags = {r.variant: on for r, on in decision.pareto_rows(rows, 1)}
    assert flags["student ONNX INT8"] and flags["student ONNX fp32"] and flags["teacher fp32 (ResNet50)"]
    assert not flags["served: TorchServe"]  # slower and no more accurate than ONNX fp32
    # at batch 32 served rows have no latency and are left out
    assert "served: TorchServe" not in {r.variant for r, _ in decision.pareto_rows(rows, 32)}


def test_qualifying_filter():
    rows, _ = decision.build_rows(RECORDS)
    names = [r.variant for r in decision.qualifying(rows, latency_budget_ms=5.0, min_accuracy=0.90, batch_size=1)]
    assert names == ["student ONNX fp32", "student distilled", "student fp32, from scratch"]  # ties: more accurate first
    names32 = [r.variant for r in decision.qualifying(rows, latency_budget_ms=12.0, min_accuracy=0.0, batch_size=32)]
    assert names32 == ["student ONNX fp32", "student ONNX INT8"]
    assert decision.qualifying(rows, latency_budget_ms=0.1, min_accuracy=0.0) == []
    with pytest.raises(ValueError):
        decision.qualifying(rows, latency_budget_ms=5.0, min_accuracy=90)  # a percentage, not a fraction
    with pytest.raises(ValueError):
        decision.qualifying(rows, latency_budget_ms=5.0, min_accuracy=0.5, batch_size=8)


def test_markdown_and_load_from_profile_folder(tmp_dirs):
    folder = config.results_dir("smoke")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "onnx.json").write_text(json.dumps([r for r in RECORDS if r["lesson"] == "onnx"]))
    rows, missing = decision.load("smoke")
    assert {r.variant for r in rows} == {"student ONNX fp32", "student ONNX INT8"}
    assert len(missing) == len(decision.CATALOGUE) - 2
    md = decision.markdown(rows)
    assert md.count("\n") == 3 and "| student ONNX INT8 | onnxruntime | 89.00% | - | 0.40 |" in md  # no count, no profile


def test_widget_updates_with_controls():
    from deploylab import widgets

    rows, _ = decision.build_rows(RECORDS)
    box = widgets.decision_explorer(rows, budget_ms=5.0, min_accuracy=0.90, batch_size=1)
    assert [r.variant for r in box.result][0] == "student ONNX fp32"
    box.controls["min_accuracy"].value = 92.0
    assert box.result == []  # only the teacher reaches 92%, and it takes 10 ms
    box.controls["budget"].value = 20.0
    assert [r.variant for r in box.result] == ["teacher fp32 (ResNet50)"]
    box.controls["batch"].value = 32
    assert box.result == []  # 50 ms at batch 32
    assert "No variant qualifies" in box.children[-1].value


def test_report_plot_marks_pareto_front():
    from deploylab import plots

    recs = [{**r, "runtime": "x", "profile": "smoke", "hardware": {"cpu": "cpu"}} for r in RECORDS]
    fig = plots.accuracy_vs_latency(recs, batch_size=1, mark_pareto=True)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["Pareto front"]
    rows, _ = decision.build_rows(RECORDS)
    fig2 = plots.pareto(rows, 1)
    assert fig2.axes[0].get_legend() is not None
