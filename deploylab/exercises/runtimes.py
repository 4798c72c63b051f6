"""Lesson 04b's exercise: the fp32 floor of the student at batch 32, and ONNX Runtime's share of it.

The learner turns the student's FLOPs per image and the machine's measured fp32 matmul rate into
the time no fp32 runtime can beat by much at batch 32 (``floor_b32_ms``), then divides it by ONNX
Runtime fp32's measured p50 at batch 32 (``ort_share``, a fraction).
"""

from __future__ import annotations

from typing import Any

from . import Exercise, WrongAnswer, as_number

NAME = "runtime_floor"
BATCH = 32
RELATIVE = 0.01  # answers within 1% of the solution pass (rounding)


def solution(*, flops_per_image: float, gflops: float, ort_p50_b32_ms: float) -> dict[str, Any]:
    """FLOPs of 32 images over the rate (FLOP/s), in ms; then the floor over the measured p50."""
    floor_b32_ms = flops_per_image * BATCH / (gflops * 1e9) * 1000
    return {"floor_b32_ms": floor_b32_ms, "ort_share": floor_b32_ms / ort_p50_b32_ms}


def _close(value: float, right: float) -> bool:
    return abs(value - right) <= RELATIVE * abs(right)


def check(answers: dict[str, Any], *, flops_per_image: float, gflops: float, ort_p50_b32_ms: float) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    right = solution(flops_per_image=flops_per_image, gflops=gflops, ort_p50_b32_ms=ort_p50_b32_ms)
    floor, share = as_number(answers["floor_b32_ms"]), as_number(answers["ort_share"])
    if not isinstance(floor, (int, float)) or not isinstance(share, (int, float)):
        raise WrongAnswer("both answers are numbers: floor_b32_ms in ms, ort_share a fraction")
    if not _close(floor, right["floor_b32_ms"]):
        f = right["floor_b32_ms"]
        hint = ("that is the floor of one image: multiply by the batch of 32" if _close(floor * BATCH, f) else
                "that counts multiply-adds, not FLOPs: flops already holds 2 per multiply-add" if _close(floor * 2, f) else
                "that is in seconds: multiply by 1000 for ms" if _close(floor * 1000, f) else
                "floor = flops * 32 / (gflops * 1e9) seconds, in ms")
        raise WrongAnswer(f"floor_b32_ms is off ({floor:.4g} ms): {hint}")
    if not _close(share, right["ort_share"]):
        hint = ("that is p50 / floor: divide the floor by the p50" if _close(1 / share, right["ort_share"]) else
                "give a fraction, not a percentage" if _close(share / 100, right["ort_share"]) else
                "ort_share = floor_b32_ms / ONNX Runtime fp32's p50 at batch 32")
        raise WrongAnswer(f"ort_share is off ({share:.4g}): {hint}")
    return (f"the floor at batch 32 is {right['floor_b32_ms']:.3f} ms; ONNX Runtime fp32 runs at "
            f"{right['ort_share']:.0%} of the matmul rate")


def example_inputs() -> dict[str, Any]:
    """The shipped student's FLOPs per image, this machine's matmul rate and its ONNX Runtime p50 at batch 32."""
    import tempfile
    from pathlib import Path

    from deploylab import assets, bench, data, export, onnxrt
    from deploylab.backends import choice, harness

    student = assets.student("workshop", build=False).model
    x, _ = data.tensors("test", BATCH)
    path = Path(tempfile.mkdtemp(prefix="deploylab-exercise-04b-")) / "student.onnx"
    export.export_onnx(student, path, example=x[:2])
    latency = bench.compare_latency({"ort": onnxrt.as_callable(onnxrt.session(path))}, {BATCH: x},
                                    warmup=2, rounds=1, repeats=5, progress=False)
    return {"flops_per_image": float(sum(choice.conv_flops(student, x[:1]).values())),
            "gflops": harness.matmul_gflops(256, repeats=3), "ort_p50_b32_ms": latency["ort"][BATCH].p50_ms}


def wrong_answers(answers: dict[str, Any], **_: Any) -> list[dict[str, Any]]:
    """Near misses: one image's floor, MACs for FLOPs, seconds for ms, the share inverted or in percent."""
    f, s = answers["floor_b32_ms"], answers["ort_share"]
    return [{"floor_b32_ms": f / BATCH, "ort_share": s}, {"floor_b32_ms": f / 2, "ort_share": s},
            {"floor_b32_ms": f / 1000, "ort_share": s}, {"floor_b32_ms": f, "ort_share": 1 / s},
            {"floor_b32_ms": f, "ort_share": s * 100}]


EXERCISE = Exercise(
    name=NAME,
    lesson="04b_runtimes",
    answers=("floor_b32_ms", "ort_share"),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
