"""Lesson 00's exercise: write the timing loop yourself -- threads, warm-up, interleaved rounds, percentiles.

The learner writes two functions:

- ``timing_loop(fns, x, *, warmup, rounds, threads)``: set the thread count, warm every variant up with
  ``warmup`` untimed calls, then time ``rounds`` interleaved rounds (A B A B ...), one call of each variant per
  round; return ``{name: [milliseconds of each timed call]}``;
- ``percentiles(samples_ms)``: ``(p50, p90, p99)`` of raw timings, as NumPy computes them.

The check runs the learner's loop on probes -- callables that busy-wait a known time (1 and 4 ms) and log
every call with the thread count it ran under -- and verifies from what was measured: the call order (warm-up
first, then interleaved), the threads, the count and units of the samples (each at least the probe's wait),
and the percentiles of the learner's own timings against ``np.percentile``. Nothing depends on how fast
or loaded the machine is: a busy wait can only last longer, never shorter.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import Exercise, WrongAnswer

WARMUP, ROUNDS = 3, 8
PROBE_MS = {"a": 1.0, "b": 4.0}  # what each probe waits per call
# Unsorted, with an outlier: nearest-rank, max-as-p99 and mean-as-p50 all differ from np.percentile here.
FIXED_SAMPLES = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 10.0, 40.0]


def _probes(log: list[tuple[str, int]]) -> dict[str, Callable[[Any], Any]]:
    def probe(name: str) -> Callable[[Any], Any]:
        def fn(x: Any) -> Any:
            log.append((name, torch.get_num_threads()))
            end = time.perf_counter() + PROBE_MS[name] / 1000
            while time.perf_counter() < end:  # a busy wait: at least PROBE_MS, however loaded the machine is
                pass
            return x
        return fn
    return {name: probe(name) for name in PROBE_MS}


def _as_triple(value: Any) -> tuple[float, float, float]:
    if isinstance(value, dict):
        value = [value.get(k) for k in ("p50", "p90", "p99")]
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise WrongAnswer(f"percentiles must return three numbers (p50, p90, p99), got {value!r}") from None
    if len(out) != 3:
        raise WrongAnswer(f"percentiles must return three numbers (p50, p90, p99), got {len(out)}")
    return out  # type: ignore[return-value]


def _check_percentiles(percentiles: Callable, samples: list[float], what: str) -> None:
    got = _as_triple(percentiles(list(samples)))
    want = np.percentile(np.asarray(samples, dtype=float), [50, 90, 99])
    for label, g, w in zip(("p50", "p90", "p99"), got, want, strict=True):
        if not np.isclose(g, w, rtol=1e-6, atol=1e-9):
            hint = ""
            if label == "p50" and np.isclose(g, np.mean(samples)):
                hint = " -- that is the mean; p50 is the median"
            elif label == "p99" and np.isclose(g, np.max(samples)):
                hint = " -- that is the maximum; p99 interpolates between the two largest of few samples"
            raise WrongAnswer(f"{label} of {what} is {w:.4g}, percentiles gave {g:.4g}{hint}: use "
                              "np.percentile(samples, [50, 90, 99]) (linear interpolation, sorted for you)")


def check(answers: dict[str, Any]) -> str:
    """Run the learner's loop on the probes; verify order, threads, samples; then their percentiles."""
    timing_loop, percentiles = answers["timing_loop"], answers["percentiles"]
    for name, f in (("timing_loop", timing_loop), ("percentiles", percentiles)):
        if not callable(f):
            raise WrongAnswer(f"{name} must be a function (def {name}(...): ...), got {type(f).__name__}")
    before = torch.get_num_threads()
    threads = 1 if before != 1 else 2  # a count the loop must set itself
    log: list[tuple[str, int]] = []
    probes = _probes(log)
    try:
        samples = timing_loop(probes, torch.zeros(1), warmup=WARMUP, rounds=ROUNDS, threads=threads)
    except TypeError as e:
        raise WrongAnswer(f"timing_loop(fns, x, *, warmup, rounds, threads) failed: {e}") from None
    finally:
        torch.set_num_threads(before)
    n = len(probes)
    if not isinstance(samples, dict) or set(samples) != set(probes):
        raise WrongAnswer(f"timing_loop must return a dict with one list of timings per variant ({sorted(probes)}), "
                          f"got {type(samples).__name__}")
    calls = Counter(name for name, _ in log)
    if any(calls[k] != WARMUP + ROUNDS for k in probes):
        raise WrongAnswer(f"each variant must be called warmup + rounds = {WARMUP + ROUNDS} times "
                          f"(called: {dict(calls)}): {WARMUP} untimed warm-up calls, then one call per round")
    if any(t != threads for _, t in log):
        raise WrongAnswer(f"the variants ran with {sorted({t for _, t in log})} threads, not threads={threads}: "
                          "call torch.set_num_threads(threads) before the first call")
    warm, timed = [k for k, _ in log[: WARMUP * n]], [k for k, _ in log[WARMUP * n:]]
    if Counter(warm) != Counter({k: WARMUP for k in probes}):
        raise WrongAnswer("warm up every variant first: the first warmup x (number of variants) calls must be "
                          "the untimed warm-up of each variant, before any timed round")
    for r in range(ROUNDS):
        if sorted(timed[r * n:(r + 1) * n]) != sorted(probes):
            raise WrongAnswer("the timed calls are not interleaved: each round must call every variant once "
                              "(A B A B ...), so that drift of the machine hits all of them alike -- "
                              "A A A ... B B B ... gives B whatever the machine did later")
    for name, s in samples.items():
        if len(s) != ROUNDS:
            raise WrongAnswer(f"{name}: {len(s)} timings for rounds={ROUNDS}"
                              + (": the warm-up calls are timed too; leave them out" if len(s) == WARMUP + ROUNDS else ""))
        values = np.asarray([float(v) for v in s])
        low = PROBE_MS[name]
        if np.median(values) < low / 2:
            raise WrongAnswer(f"{name} waits {low:.0f} ms per call, your timings have median {np.median(values):.3g}: "
                              "report milliseconds ((time.perf_counter() - start) * 1000)")
        if np.median(values) > 200 * low:
            raise WrongAnswer(f"{name} waits {low:.0f} ms per call, your timings have median {np.median(values):.3g}: "
                              "milliseconds, not microseconds")
        if values.min() < 0.98 * low:
            raise WrongAnswer(f"{name} waits at least {low:.0f} ms per call, yet a timing reads {values.min():.3f}: "
                              "take the time right before and right after the one call you time")
    _check_percentiles(percentiles, FIXED_SAMPLES, f"{FIXED_SAMPLES}")
    _check_percentiles(percentiles, list(samples["b"]), "your timings of b")
    p50, _, p99 = _as_triple(percentiles(list(samples["b"])))
    return (f"threads set, {WARMUP} warm-up calls each, {ROUNDS} interleaved rounds; the 4 ms probe measured "
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms on this machine")


def solution() -> dict[str, Any]:
    """Set the threads; warm every variant up; time interleaved rounds with perf_counter; NumPy's percentiles."""
    def timing_loop(fns, x, *, warmup, rounds, threads):
        torch.set_num_threads(threads)
        for fn in fns.values():  # untimed: first calls allocate, pick kernels, fill caches
            for _ in range(warmup):
                fn(x)
        samples = {name: [] for name in fns}
        for _ in range(rounds):  # A B A B ...: drift hits every variant alike
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                samples[name].append((time.perf_counter() - start) * 1000)  # ms
        return samples

    def percentiles(samples_ms):
        p50, p90, p99 = np.percentile(samples_ms, [50, 90, 99])
        return float(p50), float(p90), float(p99)

    return {"timing_loop": timing_loop, "percentiles": percentiles}


def example_inputs() -> dict[str, Any]:
    """None: the check builds its own probes."""
    return {}


def wrong_answers(answers: dict[str, Any]) -> list[dict[str, Any]]:
    """Near misses: A-then-B timing, no warm-up, warm-up timed too, seconds, threads ignored; mean/max/unsorted percentiles."""
    loop, pct = answers["timing_loop"], answers["percentiles"]

    def timed_ms(fn, x):
        start = time.perf_counter()
        fn(x)
        return (time.perf_counter() - start) * 1000

    def a_then_b(fns, x, *, warmup, rounds, threads):
        torch.set_num_threads(threads)
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        return {name: [timed_ms(fn, x) for _ in range(rounds)] for name, fn in fns.items()}  # A A A ... B B B ...

    def no_warmup(fns, x, *, warmup, rounds, threads):
        return loop(fns, x, warmup=0, rounds=rounds, threads=threads)

    def warmup_timed(fns, x, *, warmup, rounds, threads):
        torch.set_num_threads(threads)
        out = {name: [] for name in fns}
        for _ in range(warmup + rounds):
            for name, fn in fns.items():
                out[name].append(timed_ms(fn, x))
        return out

    def seconds(fns, x, *, warmup, rounds, threads):
        return {k: [v / 1000 for v in s] for k, s in loop(fns, x, warmup=warmup, rounds=rounds, threads=threads).items()}

    def threads_ignored(fns, x, *, warmup, rounds, threads):
        return loop(fns, x, warmup=warmup, rounds=rounds, threads=torch.get_num_threads())

    def mean_as_p50(s):
        _, p90, p99 = pct(s)
        return float(np.mean(s)), p90, p99

    def max_as_p99(s):
        p50, p90, _ = pct(s)
        return p50, p90, float(np.max(s))

    def unsorted_index(s):
        return tuple(float(s[min(len(s) - 1, int(q * len(s)))]) for q in (0.5, 0.9, 0.99))

    return ([{"timing_loop": bad, "percentiles": pct} for bad in (a_then_b, no_warmup, warmup_timed, seconds, threads_ignored)]
            + [{"timing_loop": loop, "percentiles": bad} for bad in (mean_as_p50, max_as_p99, unsorted_index)])


EXERCISE = Exercise(name="interleaved_timing", lesson="00_baseline", answers=("timing_loop", "percentiles"),
                    check=check, solution=solution, example_inputs=example_inputs, wrong_answers=wrong_answers)
