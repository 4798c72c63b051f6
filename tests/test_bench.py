import math

import pytest
import torch

from deploylab import bench, config


def test_percentiles_of_known_samples():
    s = bench.latency_percentiles(list(range(1, 101)), batch_size=1)  # 1..100 ms
    assert (s.n, s.min_ms, s.max_ms) == (100, 1, 100)
    assert s.mean_ms == 50.5
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    assert s.throughput == pytest.approx(1000 / 50.5)


def test_throughput_counts_images_not_calls():
    s = bench.latency_percentiles([10.0, 10.0, 10.0], batch_size=32)
    assert s.throughput == pytest.approx(3200.0)  # 32 images every 10 ms
    assert s.p99_ms == s.p50_ms == 10.0


@pytest.mark.parametrize("bad", [[], [1.0, -2.0], [1.0, math.nan]])
def test_bad_samples_are_rejected(bad):
    with pytest.raises(ValueError):
        bench.latency_percentiles(bad)


def test_comparison_is_interleaved():
    calls = []
    variants = {name: (lambda x, name=name: calls.append((name, len(x)))) for name in "ABC"}
    inputs = bench.example_inputs(torch.zeros(5, 1, 32, 32), batch_sizes=(1, 32))
    out = bench.compare_latency(variants, inputs, profile=config.PROFILES["smoke"], warmup=1, rounds=2, repeats=2, progress=False)
    assert set(out) == {"A", "B", "C"} and set(out["A"]) == {1, 32}
    assert out["B"][32].n == 4 and out["B"][32].batch_size == 32
    timed = [name for name, b in calls[3:3 + 12]]  # after one warm-up call each, batch 1
    assert timed == list("AABBCCAABBCC")  # round 1: A B C, round 2: A B C
    assert {b for _, b in calls} == {1, 32}


def test_example_inputs_repeat_real_images():
    x = torch.arange(3.0).reshape(3, 1, 1, 1)
    inputs = bench.example_inputs(x, batch_sizes=(1, 7))
    assert inputs[1].shape[0] == 1 and inputs[7].shape[0] == 7
    assert inputs[7].flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError):
        bench.example_inputs(torch.zeros(0, 1, 32, 32))


def test_modules_run_in_eval_mode_without_grad():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.Dropout(0.9)).train()
    fn = bench.as_callable(model)
    out1, out2 = fn(torch.ones(1, 4)), fn(torch.ones(1, 4))
    assert not model.training and not out1.requires_grad and torch.equal(out1, out2)


def test_sizes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x" * 5)
    assert bench.file_size(tmp_path / "a") == 10 and bench.file_size(tmp_path) == 15
    lin = torch.nn.Linear(100, 100)  # 10,100 float32 parameters
    assert 40_400 <= bench.state_dict_size(lin) < 40_400 + 4_000


def test_latency_table_has_a_row_per_variant_and_batch():
    s = {b: bench.latency_percentiles([1.0, 2.0], b) for b in (1, 32)}
    table = bench.latency_table({"teacher": s, "student": s})
    rows, note = table.split("\n\n")
    assert rows.count("\n") == 1 + 4 and "| student | 32 |" in rows
    assert bench.THROUGHPUT_COLUMN in rows.splitlines()[0] and note.startswith(f"*{bench.THROUGHPUT_COLUMN}*: the batch size divided")
