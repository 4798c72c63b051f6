"""Lesson 05's exercise: what does lossy JPEG do to the served predictions?

The learner sends the first :data:`IMAGES` parity images to the served student as JPEG (quality
75) instead of PNG and counts the served top-1 predictions that differ from in-process ONNX
Runtime on the original pixels (``jpeg_disagreements``, an int). The check decodes the same JPEG
bytes in process (Pillow, as the handler does) and counts the changes itself.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import Exercise, WrongAnswer, as_number

NAME = "jpeg_disagreements"
IMAGES = 64  # the first parity images
QUALITY = 75


def jpeg_bytes(image: np.ndarray, quality: int = QUALITY) -> bytes:
    """A uint8 (H, W) image encoded as JPEG, as a client would upload it."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def solution(*, images: np.ndarray, reference: np.ndarray, session: Any,
             classify: Callable[[bytes, str], int]) -> dict[str, Any]:
    """Send each image as JPEG through ``classify`` (the served model) and count the changed top-1 answers."""
    served = [classify(jpeg_bytes(image), "image/jpeg") for image in images[:IMAGES]]
    return {"jpeg_disagreements": int((np.array(served) != np.asarray(reference)[:IMAGES].argmax(1)).sum())}


def expected_disagreements(images: np.ndarray, reference: np.ndarray, session: Any) -> int:
    """The same count, computed in process: JPEG round trip, the training preprocessing, ONNX Runtime."""
    from deploylab import data, onnxrt

    decoded = np.stack([np.asarray(Image.open(io.BytesIO(jpeg_bytes(im))).convert("L")) for im in images[:IMAGES]])
    top1 = onnxrt.run(session, data.preprocess(decoded)).argmax(1)
    return int((top1 != np.asarray(reference)[:IMAGES].argmax(1)).sum())


def check(answers: dict[str, Any], *, images: np.ndarray, reference: np.ndarray, session: Any,
          classify: Callable[[bytes, str], int]) -> str:
    """The sentence printed for a right answer; :class:`WrongAnswer` with a hint otherwise."""
    got = as_number(answers["jpeg_disagreements"])
    if isinstance(got, bool) or not isinstance(got, (int, np.integer)):
        raise WrongAnswer(f"jpeg_disagreements is a count of images (an int), got {got!r}")
    expected = expected_disagreements(images, reference, session)
    if got == IMAGES - expected:
        raise WrongAnswer(f"{got} is the number of predictions that stayed the same: count the ones that changed")
    if got != expected:
        raise WrongAnswer(f"{got} is not the number of the first {IMAGES} images whose top-1 prediction changes; "
                          f"send each as JPEG at quality {QUALITY} and compare with reference[:{IMAGES}].argmax(1)")
    return (f"{expected} of {IMAGES} change (lossy compression moves pixels, so the input the model sees changes)")


def example_inputs() -> dict[str, Any]:
    """The shipped student in ONNX Runtime, the first test images, and an in-process stand-in for the server's answer
    (the serving protocol's decoding of the body, the training preprocessing, ONNX Runtime)."""
    from deploylab import assets, data, export, onnxrt
    from deploylab.serving import protocol

    path = Path(tempfile.mkdtemp(prefix="deploylab-exercise-05-")) / "student.onnx"
    images, _ = data.raw_split("test", IMAGES)
    export.export_onnx(assets.student("workshop", build=False).model, path, example=data.preprocess(images[:2]))
    session = onnxrt.session(path)

    def classify(body: bytes, content_type: str) -> int:
        return int(onnxrt.run(session, protocol.model_input(protocol.decode_http(body, content_type)))[0].argmax())

    return {"images": images, "reference": onnxrt.run(session, data.preprocess(images)), "session": session,
            "classify": classify}


def wrong_answers(answers: dict[str, Any], **inputs: Any) -> list[dict[str, Any]]:
    """Near misses: one off either way, the unchanged count, a fraction instead of a count."""
    n = answers["jpeg_disagreements"]
    wrong = [n + 1, IMAGES - n, n / IMAGES if n else 0.5] + ([n - 1] if n else [])
    return [{"jpeg_disagreements": w} for w in dict.fromkeys(wrong) if w != n]


EXERCISE = Exercise(
    name=NAME,
    lesson="05_torchserve",
    answers=("jpeg_disagreements",),
    check=check,
    solution=solution,
    example_inputs=example_inputs,
    wrong_answers=wrong_answers,
)
