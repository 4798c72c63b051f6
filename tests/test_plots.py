import matplotlib

matplotlib.use("Agg")

from deploylab import plots  # noqa: E402


def _records(points: list[tuple[float, float]]) -> list[dict]:
    return [{"variant": f"variant {i}", "runtime": "pytorch eager", "accuracy": acc, "profile": "smoke",
             "hardware": {"cpu": "cpu"}, "latency_ms": {"32": {"p50_ms": ms}}} for i, (ms, acc) in enumerate(points)]


def test_accuracy_vs_latency_numbers_points_without_overlap_and_names_them_in_a_legend():
    crowded = [(10.0 + 0.1 * i, 0.904) for i in range(6)] + [(1.8, 0.91), (1.85, 0.91), (40.0, 0.85)]
    fig = plots.accuracy_vs_latency(_records(crowded), batch_size=32)
    ax = fig.axes[0]
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == [str(i + 1) for i in range(len(crowded))]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "numbers overlap"
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert names[0] == "1  variant 0 (pytorch eager)" and len(names) == len(crowded)


def test_log_axis_labels_only_plain_major_ticks():
    fig = plots.accuracy_vs_latency(_records([(1.7, 0.9), (12.0, 0.91), (45.0, 0.92)]), batch_size=32)
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    major = [t.get_text() for t, v in zip(ax.xaxis.get_majorticklabels(), ax.get_xticks()) if lo <= v <= hi]
    assert major and all(label.replace(".", "").isdigit() for label in major), major  # "2", "5", "10", not 2x10^0
    assert all(t.get_text() == "" for t in ax.xaxis.get_minorticklabels()), "minor ticks must carry no label"


def test_status_counters_colour_errors_red_whatever_the_order():
    from matplotlib.colors import to_hex

    fig = plots.status_counters({"Requests4XX": 12.0, "Requests2XX": 300.0, "Requests5XX": 0.0})
    bars = fig.axes[0].patches
    assert [to_hex(b.get_facecolor()) for b in bars] == [to_hex(c) for c in ("tab:green", "tab:red", "darkred")]
    assert [b.get_height() for b in bars] == [300.0, 12.0, 0.0]


def test_pareto_numbers_points_without_overlap_names_them_and_colours_every_kind():
    from deploylab import decision

    kinds = ("pytorch", "onnxruntime", "executorch", "openvino", "aotinductor", "served")
    crowded = [(1.2 + 0.05 * i, 0.9045) for i in range(12)] + [(0.17, 0.9045), (0.23, 0.912), (1.9, 0.916), (5.0, 0.86)]
    rows = [decision.Row(f"variant {i}", kinds[i % len(kinds)], acc, 10_000, ms, None, None, None, "src")
            for i, (ms, acc) in enumerate(crowded)]
    fig = plots.pareto(rows, 1)
    ax = fig.axes[0]
    fig.canvas.draw()
    numbers = [t for t in ax.texts if t.get_text().isdigit()]
    assert [t.get_text() for t in numbers] == [str(i + 1) for i in range(len(rows))]
    boxes = [t.get_window_extent() for t in numbers]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "numbers overlap"
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert names[0] == "1  variant 0" and len(names) == len(rows)
    assert sum(n.endswith("[front]") for n in names) == 3  # 0.17 ms, 0.23 ms and 1.9 ms: none faster and as accurate
    kind_legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert kind_legend == [*kinds, "Pareto front"]
