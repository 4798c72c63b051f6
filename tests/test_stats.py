import numpy as np
import pytest
import torch

from deploylab import data, stats


def _logits(pred: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(pred), 10).float()


def test_paired_difference_and_its_verdicts():
    y = np.arange(2000) % 10
    ref = _logits(y)  # the reference is right everywhere
    two_worse = y.copy()
    two_worse[:2] = (y[:2] + 1) % 10  # 2 images of 2,000: 0.1 point, inside the noise
    s = stats.score(_logits(two_worse), torch.as_tensor(y), ref, resamples=500)
    assert s.delta_points == pytest.approx(-0.1) and s.within_noise and not stats.better_beyond_noise(s)
    assert stats.within_tolerance(s, 1.0) and "within noise" in s.difference()
    many_worse = y.copy()
    many_worse[:200] = (y[:200] + 1) % 10  # 10 points
    s = stats.score(_logits(many_worse), torch.as_tensor(y), ref, resamples=500)
    assert not s.within_noise and not stats.within_tolerance(s, 1.0) and "beyond noise" in s.difference()
    flipped = stats.score(ref, torch.as_tensor(y), _logits(many_worse), resamples=500)  # the other way round
    assert stats.better_beyond_noise(flipped)
    with pytest.raises(ValueError):
        stats.within_tolerance(s, -1.0)


def test_choice_reexports_the_same_score():
    from deploylab.backends import choice

    assert choice.score is stats.score and choice.Score is stats.Score and choice.wilson is stats.wilson


def test_test_images_are_refused_and_validation_images_pass():
    x_test, _ = data.tensors("test", 300)
    with pytest.raises(data.TestImagesError, match="validation"):
        data.refuse_test_images(x_test, "a choice")
    x_val, _ = data.tensors("val", 300)
    data.refuse_test_images(x_val, "a choice")
    mixed = torch.cat([x_val[:250], x_test[:50]])  # a sixth are test images: refused
    with pytest.raises(data.TestImagesError):
        data.refuse_test_images(mixed, "a choice")
