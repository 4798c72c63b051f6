"""Was the machine quiet while we timed? The share of its CPU that other work took during a measurement.

A benchmark on 2 cores is only as good as the quiet around it: a build, a test run or another VM's
steal time slows every variant, and an interleaved comparison only protects the *ratio*. So every
timed run here is bracketed by :func:`snapshot` and judged by :func:`busy_elsewhere`: the CPU time
the whole machine spent (from ``/proc/stat``, steal time included: cycles the hypervisor gave to
another guest) minus what this process spent (``os.times``), as a share of the cores' time.
:func:`measure_quietly` repeats a measurement that ran on a busy machine and, if the machine stays
busy, says so beside the result instead of passing it off as clean.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Above this share of the machine's CPU used by other processes, a timing is measured again ...
BUSY_SHARE = 0.15
# ... provided the other processes took at least this much CPU time in all: /proc/stat counts in clock ticks
# (10 ms) while os.times counts exactly, so a timing of a fraction of a second differs by a few ticks on a
# quiet machine (measured: 22-33% "busy" for a 0.1 s timing, 3.5% over the same 0.3 s as a whole).
MIN_OTHER_S = 0.25


@dataclass(frozen=True)
class Snapshot:
    """Cumulative CPU seconds of the whole machine (busy, all) and of this process, at one instant."""

    machine_busy_s: float
    machine_total_s: float
    own_s: float


def parse_proc_stat(text: str) -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores from ``/proc/stat``'s first line; idle and iowait are not busy."""
    fields = text.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ValueError(f"not a /proc/stat 'cpu' line: {fields[:3]}")
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(ticks)
    idle = ticks[3] + ticks[4]
    return (total - idle) / tick, total / tick


def snapshot() -> Snapshot | None:
    """The machine's and this process's CPU seconds now; None where ``/proc/stat`` does not exist (macOS)."""
    try:
        busy, total = parse_proc_stat(Path("/proc/stat").read_text())
    except OSError:
        return None
    t = os.times()
    return Snapshot(busy, total, t.user + t.system)


def busy_elsewhere(before: Snapshot | None, after: Snapshot | None) -> float | None:
    """Share of the machine's CPU time between two snapshots that other processes (or other guests) used."""
    if before is None or after is None:
        return None
    total = after.machine_total_s - before.machine_total_s
    if total <= 0:
        return 0.0
    other = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    if other < MIN_OTHER_S:  # within the counters' granularity: nothing measurable ran beside us
        return 0.0
    return min(1.0, max(0.0, other / total))


def measure_quietly(measure: Callable[[], T], *, attempts: int = 2, busy_share: float = BUSY_SHARE,
                    say: Callable[[str], None] = print) -> tuple[T, float | None]:
    """Run ``measure``; while other work took more than ``busy_share`` of the CPU meanwhile, run it again.

    Returns the last result and the share measured during it. When every attempt ran on a busy machine,
    the last result is returned with a line that says so (printed beside the figures it concerns).
    """
    share = None
    for attempt in range(1, attempts + 1):
        before = snapshot()
        result = measure()
        share = busy_elsewhere(before, snapshot())
        if share is None or share <= busy_share:
            return result, share
        if attempt < attempts:
            say(f"the machine was busy ({share:.0%} of its CPU went to other processes during this timing): measuring again")
            time.sleep(0.2)
    say(f"WARNING: the machine stayed busy ({share:.0%} of its CPU went to other processes during the last timing): "
        "these latencies are slower than this machine's and only their ratios within one run compare")
    return result, share
