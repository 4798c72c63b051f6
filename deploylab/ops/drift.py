"""Drift: production inputs that stop looking like the training data, and detectors that notice (lesson 09).

- :data:`SHIFTS` -- the ways real inputs shift, applied to real uint8 images: brightness and contrast
  (another camera, another exposure), rotation (items photographed askew), sensor noise, and a
  different class mix (what people send changes, the images do not);
- two detectors over windows of a stream, each compared with a reference window of validation images:
  on the **inputs**, the two-sample Kolmogorov-Smirnov statistic (:func:`ks_statistic`) of per-image
  brightness and contrast (:func:`image_features`); on the **predictions**, the population stability
  index (:func:`psi`) of the predicted classes;
- :class:`Detector` -- a statistic and its threshold, chosen on validation windows only (the
  ``1 - false_alarm`` quantile of the statistic over windows of unshifted validation images), then
  measured on test images: the false-alarm rate on unshifted windows, and on a shifted stream the
  detection delay (images from the first shifted one to the end of the first window that alarms).

numpy only (no scipy in the lock): the statistics are a few lines each, shown in the lesson.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import config

CLASS_MIX = {0: 0.35, 6: 0.35}  # T-shirt/top and Shirt: 70% of the stream (a promotion on tops); the rest shared evenly


@dataclass(frozen=True)
class DriftSizes:
    """Lesson-09 drift sizes per profile (the code path is the same in every profile)."""

    window: int  # images per window of the stream
    reference: int  # validation images the detectors compare each window with
    calibration_windows: int  # windows of other validation images that set each threshold
    test_images: int | None  # test images in each stream (None: all 10,000)
    false_alarm: float = 0.01  # the false-alarm rate per window the thresholds aim at


SIZES: dict[str, DriftSizes] = {
    "smoke": DriftSizes(window=64, reference=1_000, calibration_windows=200, test_images=512),
    "workshop": DriftSizes(window=200, reference=2_500, calibration_windows=1_000, test_images=None),
    "full": DriftSizes(window=200, reference=2_500, calibration_windows=2_000, test_images=None),
}


def sizes(profile: "config.Profile | str | None" = None) -> DriftSizes:
    """The drift sizes for ``profile``."""
    return SIZES[config.get_profile(profile).name]


# --------------------------------------------------------------------------------------------
# Shifts of real images (uint8, (N, 28, 28)) -> uint8 images of the same shape
# --------------------------------------------------------------------------------------------


def brightness_contrast(images: np.ndarray, *, contrast: float = 0.6, brightness: float = 60.0, seed: int = 0) -> np.ndarray:
    """``contrast * x + brightness``, clipped: a washed-out, brighter photograph."""
    return np.clip(images.astype(np.float32) * contrast + brightness, 0, 255).round().astype(np.uint8)


def rotation(images: np.ndarray, *, degrees: float = 20.0, seed: int = 0) -> np.ndarray:
    """Each image turned by a random angle of ``degrees/2`` to ``degrees`` either way (bilinear, black fill)."""
    rng = np.random.default_rng(seed)
    angle = np.deg2rad(rng.uniform(degrees / 2, degrees, len(images)) * rng.choice([-1.0, 1.0], len(images)))
    cos, sin = torch.tensor(np.cos(angle), dtype=torch.float32), torch.tensor(np.sin(angle), dtype=torch.float32)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1).clamp(0, 255).round().to(torch.uint8).numpy()


def noise(images: np.ndarray, *, sigma: float = 25.0, seed: int = 0) -> np.ndarray:
    """Gaussian sensor noise of ``sigma`` grey levels, clipped."""
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float32) + rng.normal(0.0, sigma, images.shape), 0, 255).round().astype(np.uint8)


def class_mix_indices(labels: np.ndarray, n: int, mix: dict[int, float] = CLASS_MIX, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` images drawn (with replacement) so that class ``c`` has share ``mix[c]``, the others the rest evenly."""
    classes = np.unique(labels)
    rest = [c for c in classes if c not in mix]
    share = {**{c: (1.0 - sum(mix.values())) / len(rest) for c in rest}, **mix}
    weights = np.array([share[c] for c in labels]) / np.bincount(labels)[labels]
    return np.random.default_rng(seed).choice(len(labels), n, replace=True, p=weights / weights.sum())


SHIFTS: dict[str, Callable[..., np.ndarray]] = {"brightness/contrast": brightness_contrast, "rotation": rotation, "noise": noise}


def shifted_stream(kind: str, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The test stream under shift ``kind`` (``"none"``, a key of :data:`SHIFTS`, or ``"class mix"``), in a fixed random order."""
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    if kind == "none":
        return images, labels
    if kind == "class mix":
        idx = class_mix_indices(labels, len(labels), seed=seed)
        return images[idx], labels[idx]
    return SHIFTS[kind](images, seed=seed), labels


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def image_features(images: np.ndarray) -> np.ndarray:
    """Per image: mean grey level (brightness) and its standard deviation (contrast); shape (N, 2)."""
    x = images.reshape(len(images), -1).astype(np.float32)
    return np.stack([x.mean(1), x.std(1)], 1)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def psi(reference: np.ndarray, window: np.ndarray, classes: int = 10, eps: float = 1e-3) -> float:
    """Population stability index of two label samples: sum over classes of (w - r) * ln(w / r), shares floored at ``eps``."""
    r = np.maximum(np.bincount(reference, minlength=classes) / len(reference), eps)
    w = np.maximum(np.bincount(window, minlength=classes) / len(window), eps)
    return float(np.sum((w - r) * np.log(w / r)))


def input_statistic(reference: np.ndarray, window: np.ndarray) -> float:
    """The input detector: the larger KS statistic of brightness and contrast (features from :func:`image_features`)."""
    return max(ks_statistic(reference[:, j], window[:, j]) for j in range(reference.shape[1]))


def prediction_statistic(reference: np.ndarray, window: np.ndarray) -> float:
    """The prediction detector: PSI of the predicted classes."""
    return psi(reference, window)


# --------------------------------------------------------------------------------------------
# A detector: its threshold from validation windows, its false alarms and delay on test streams
# --------------------------------------------------------------------------------------------


def windows(values: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of ``size`` rows (a last partial one dropped)."""
    return [values[i:i + size] for i in range(0, len(values) - size + 1, size)]


@dataclass
class Detector:
    """A drift statistic over windows, its reference and its threshold (set by :meth:`calibrate`)."""

    name: str
    statistic: Callable[[np.ndarray, np.ndarray], float]
    reference: np.ndarray
    threshold: float = float("nan")

    def calibrate(self, validation: np.ndarray, window: int, count: int, false_alarm: float, seed: int = 0) -> float:
        """Threshold = the ``1 - false_alarm`` quantile of the statistic over ``count`` random windows of
        ``validation`` (unshifted images the reference does not hold). Validation only: never test images."""
        rng = np.random.default_rng(seed)
        stats = [self.statistic(self.reference, validation[rng.choice(len(validation), window, replace=False)]) for _ in range(count)]
        self.threshold = float(np.quantile(stats, 1.0 - false_alarm))
        return self.threshold

    def scores(self, stream: np.ndarray, window: int) -> np.ndarray:
        """The statistic of each consecutive window of ``stream``."""
        return np.array([self.statistic(self.reference, w) for w in windows(stream, window)])

    def evaluate(self, stream: np.ndarray, window: int) -> dict[str, Any]:
        """Alarms over a stream: the share of windows that alarm, and the images until the first alarm (None: never)."""
        s = self.scores(stream, window)
        alarms = s > self.threshold
        first = int(np.argmax(alarms)) if alarms.any() else None
        return {"windows": len(s), "alarm_rate": float(alarms.mean()) if len(s) else float("nan"),
                "delay_images": None if first is None else (first + 1) * window, "scores": s}
