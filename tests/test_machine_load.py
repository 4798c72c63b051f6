"""The quiet-machine check behind every timing: other work on the cores is seen, and a busy run is repeated or labelled."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from deploylab import machine_load


def test_proc_stat_line_is_read_as_busy_and_total_seconds():
    tick = machine_load.os.sysconf("SC_CLK_TCK")
    busy, total = machine_load.parse_proc_stat(f"cpu  {tick} 0 {tick} {8 * tick} {tick} 0 0 {tick} 0 0\ncpu0 ...")
    assert (busy, total) == (3.0, 12.0)  # user + system + steal; idle and iowait are not busy
    with pytest.raises(ValueError, match="cpu"):
        machine_load.parse_proc_stat("intr 1 2 3")


def test_a_process_spinning_beside_us_is_seen_and_our_own_work_is_not():
    def spin_here(seconds=0.6):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    before = machine_load.snapshot()
    spin_here()
    quiet = machine_load.busy_elsewhere(before, machine_load.snapshot())
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        before = machine_load.snapshot()
        time.sleep(0.8)
        busy = machine_load.busy_elsewhere(before, machine_load.snapshot())
    finally:
        spinner.kill()
        spinner.wait()
    cores = len(machine_load.os.sched_getaffinity(0))
    assert busy > 0.6 / cores, busy  # one spinning process: about one core's share
    assert quiet < busy, (quiet, busy)


def test_a_busy_measurement_is_repeated_then_labelled(monkeypatch):
    said, calls = [], []
    shares = iter([0.5, 0.4])
    monkeypatch.setattr(machine_load, "busy_elsewhere", lambda a, b: next(shares))
    result, share = machine_load.measure_quietly(lambda: calls.append(1) or len(calls), say=said.append)
    assert result == 2 and share == 0.4 and len(calls) == 2
    assert "measuring again" in said[0] and said[1].startswith("WARNING: the machine stayed busy (40%")
    quiet = iter([0.01])
    monkeypatch.setattr(machine_load, "busy_elsewhere", lambda a, b: next(quiet))
    assert machine_load.measure_quietly(lambda: "ok", say=said.append) == ("ok", 0.01) and len(said) == 2


def test_a_short_timing_on_a_quiet_machine_is_not_called_busy():
    """Ticks against exact CPU time: a 0.1 s timing differs by a few 10 ms ticks, which is no other process."""
    before = machine_load.Snapshot(machine_busy_s=100.0, machine_total_s=1000.0, own_s=10.0)
    after = machine_load.Snapshot(machine_busy_s=100.25, machine_total_s=1000.2, own_s=10.2)  # 0.05 s "other"
    assert machine_load.busy_elsewhere(before, after) == 0.0
    loaded = machine_load.Snapshot(machine_busy_s=102.2, machine_total_s=1002.0, own_s=11.0)  # 1.2 s of others in 2 s
    assert machine_load.busy_elsewhere(before, loaded) == pytest.approx(0.6)
