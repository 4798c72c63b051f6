"""Accuracy against its noise: a Wilson interval, the paired comparison of two models on the same images, and a
choice between a simpler and a more complex option that keeps the simpler one unless the difference clears the noise.

Used by every lesson that compares variants or makes a choice from accuracies (01's layers kept in float, 02's
pruning ratios and saved student, 04b's runtime). Two models scored on the *same* images are compared image by
image (paired): the interval of their difference shrinks with their agreement, so it is much narrower than two
independent intervals would suggest, and it is the honest yardstick for "B is better than A".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Score:
    """Accuracy of one variant and its paired comparison with the reference on the same images."""

    images: int
    accuracy: float
    interval: tuple[float, float]  # 95% Wilson interval of the accuracy
    agreement: float  # top-1 agreement with the reference
    delta_points: float  # accuracy - reference accuracy, in points
    delta_interval: tuple[float, float]  # paired-bootstrap 95% interval of delta_points

    @property
    def within_noise(self) -> bool:
        """True when the 95% interval of the difference includes 0: the data cannot tell the two apart."""
        return self.delta_interval[0] <= 0.0 <= self.delta_interval[1]

    def difference(self) -> str:
        """The difference and its interval as a phrase, e.g. ``+0.10 points (95% interval -0.05 to +0.25, within noise)``."""
        lo, hi = self.delta_interval
        verdict = "within noise" if self.within_noise else "beyond noise"
        return f"{self.delta_points:+.2f} points (95% interval {lo:+.2f} to {hi:+.2f}, {verdict}; {self.images:,} images)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / n`` (sound near 0 and 1, unlike the normal one)."""
    if n <= 0:
        raise ValueError("an interval needs at least one image")
    p, z2 = correct / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(logits: torch.Tensor | np.ndarray, labels: torch.Tensor, reference: torch.Tensor | np.ndarray, *,
          resamples: int = 2000, seed: int = 0) -> Score:
    """Accuracy, its interval, agreement and the paired difference against ``reference`` logits.

    The difference is bootstrapped over images: each resample draws n images with replacement and
    takes both models' accuracy on the same draw, so the interval shrinks with their agreement
    (two variants that disagree on 10 of 10,000 images cannot differ by more than 0.1 point).
    """
    pred = torch.as_tensor(np.asarray(logits)).argmax(1).numpy()
    ref = torch.as_tensor(np.asarray(reference)).argmax(1).numpy()
    y = np.asarray(labels)
    if not len(pred) == len(ref) == len(y) or len(y) == 0:
        raise ValueError(f"need as many predictions as labels: {len(pred)}, {len(ref)}, {len(y)}")
    hit, ref_hit = (pred == y).astype(np.int8), (ref == y).astype(np.int8)
    diff = hit - ref_hit
    rng = np.random.default_rng(seed)
    boot = np.array([diff[rng.integers(0, len(y), len(y))].mean() for _ in range(resamples)]) * 100
    lo, hi = np.percentile(boot, [2.5, 97.5]) if resamples else (float(diff.mean() * 100),) * 2
    return Score(images=len(y), accuracy=float(hit.mean()), interval=wilson(int(hit.sum()), len(y)),
                 agreement=float((pred == ref).mean()), delta_points=float(diff.mean() * 100),
                 delta_interval=(float(lo), float(hi)))


def better_beyond_noise(candidate: Score) -> bool:
    """True only when ``candidate`` beats its reference with the whole 95% interval above 0.

    The rule for "is the more complex option worth it": a gain whose interval includes 0 could be
    noise (2 images in 2,000 are 0.1 point), so the simpler option (the reference) stays.
    """
    return candidate.delta_interval[0] > 0.0


def within_tolerance(candidate: Score, tolerance_points: float) -> bool:
    """True when the whole 95% interval of the loss against the reference stays above ``-tolerance_points``.

    The rule for "does this cheaper option cost at most ``tolerance_points``": the median alone would
    accept a variant whose loss could well be larger; the interval's lower end must clear the bound.
    """
    if tolerance_points < 0:
        raise ValueError(f"a tolerance is a loss in points >= 0, got {tolerance_points}")
    return candidate.delta_interval[0] >= -tolerance_points
