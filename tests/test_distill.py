import math

import pytest
import torch
import torch.nn.functional as F

from deploylab import bench, distill, models, train
from deploylab.config import PROFILES

LN3 = math.log(3.0)
# student uniform over 2 classes, teacher (0.75, 0.25): KL = 0.75 ln 1.5 + 0.25 ln 0.5
KL_KNOWN = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812...


def test_known_values_with_temperature_and_alpha():
    s = torch.zeros(1, 2)
    t = torch.tensor([[2 * LN3, 0.0]])  # at T=2: softmax(t / 2) = (0.75, 0.25)
    y = torch.tensor([0])
    soft_only = distill.kd_loss(s, t, y, temperature=2.0, alpha=1.0)
    assert soft_only.item() == pytest.approx(4 * KL_KNOWN, rel=1e-6)  # scaled by T^2 = 4
    assert KL_KNOWN == pytest.approx(0.130812, abs=1e-6)
    hard_only = distill.kd_loss(s, t, y, temperature=2.0, alpha=0.0)
    assert hard_only.item() == pytest.approx(math.log(2.0), rel=1e-6)
    mixed = distill.kd_loss(s, t, y, temperature=2.0, alpha=0.5)
    assert mixed.item() == pytest.approx(0.5 * 4 * KL_KNOWN + 0.5 * math.log(2.0), rel=1e-6)  # 0.608198
    assert mixed.item() == pytest.approx(0.608198, abs=1e-5)


def test_t1_is_cross_entropy_on_soft_labels():
    torch.manual_seed(0)
    s = torch.randn(8, 10, requires_grad=True)
    t = torch.randn(8, 10) * 3
    y = torch.randint(0, 10, (8,))
    p = t.softmax(1)
    kd = distill.kd_loss(s, t, y, temperature=1.0, alpha=1.0)
    ce_soft = F.cross_entropy(s, p)  # cross-entropy with probability targets
    entropy = -(p * p.log()).sum(1).mean()
    # KL = CE(soft labels) - H(teacher): equal up to a constant that does not depend on the student
    assert kd.item() == pytest.approx((ce_soft - entropy).item(), abs=1e-5)
    g_kd, = torch.autograd.grad(kd, s)
    g_ce, = torch.autograd.grad(F.cross_entropy(s, p), s)
    assert torch.allclose(g_kd, g_ce, atol=1e-6)


def test_alpha_zero_is_plain_cross_entropy_and_loss_is_zero_when_student_equals_teacher():
    torch.manual_seed(1)
    s, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    assert distill.kd_loss(s, torch.randn(5, 10), y, alpha=0.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert distill.kd_loss(s, s.clone(), y, temperature=3.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill.kd_loss(s, torch.randn(5, 10), y, temperature=3.0, alpha=1.0).item() > 0.01


def test_bf16_logits_give_an_fp32_scalar():
    s = torch.randn(4, 10).bfloat16()
    out = distill.kd_loss(s, torch.randn(4, 10), torch.zeros(4, dtype=torch.long))
    assert out.shape == () and out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"), ({"alpha": math.nan}, "alpha"),
    ({"temperature": 0.0}, "temperature"), ({"temperature": -2.0}, "temperature"), ({"temperature": math.inf}, "temperature"),
])
def test_bad_alpha_or_temperature_raise(kwargs, match):
    s = torch.zeros(2, 10)
    with pytest.raises(ValueError, match=match):
        distill.kd_loss(s, s, torch.zeros(2, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError, match=match):
        distill.DistillationLoss(**kwargs)


def test_non_numeric_hyperparameters_raise_type_error():
    with pytest.raises(TypeError, match="alpha"):
        distill.DistillationLoss(alpha="0.9")
    with pytest.raises(TypeError, match="temperature"):
        distill.DistillationLoss(temperature=None)


def test_shape_mismatches_raise():
    s, y = torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        distill.kd_loss(s, torch.zeros(4, 9), y)
    with pytest.raises(ValueError, match="labels"):
        distill.kd_loss(s, s, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, classes"):
        distill.kd_loss(torch.zeros(10), torch.zeros(10), y)


def test_pack_unpack_roundtrip_and_errors():
    t = torch.randn(6, 10)
    y = torch.tensor([0, 9, 3, 3, 1, 7])
    packed = distill.pack_targets(t, y)
    assert packed.shape == (6, 11) and packed.dtype == torch.float32
    t2, y2 = distill.unpack_targets(packed)
    assert torch.equal(t2, t) and torch.equal(y2, y) and y2.dtype == torch.int64
    with pytest.raises(ValueError, match="same N"):
        distill.pack_targets(t, y[:5])
    with pytest.raises(TypeError, match="integer"):
        distill.pack_targets(t, y.float())
    with pytest.raises(ValueError, match="pack_targets"):
        distill.unpack_targets(y)


def test_distillation_loss_matches_kd_loss_and_counts():
    torch.manual_seed(2)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    fn = distill.DistillationLoss(temperature=2.0, alpha=0.7)
    got = fn(s, distill.pack_targets(t, y))
    assert got.item() == pytest.approx(distill.kd_loss(s, t, y, temperature=2.0, alpha=0.7).item(), rel=1e-6)
    summary = fn.summary()
    assert summary["train_accuracy"] == pytest.approx((s.argmax(1) == y).float().mean().item())
    assert summary["teacher_agreement"] == pytest.approx((s.argmax(1) == t.argmax(1)).float().mean().item())


def test_fit_trains_with_packed_targets():
    """train.fit batches packed targets like labels: the student learns to imitate a fixed teacher."""
    torch.manual_seed(0)
    x = torch.randn(256, 1, 32, 32)
    teacher_logits = torch.zeros(256, 10)
    teacher_logits[:, 3] = 8.0  # a teacher that always says class 3
    y = torch.full((256,), 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
    loss = distill.DistillationLoss(temperature=2.0, alpha=0.9)
    hist = train.fit(model, x, distill.pack_targets(teacher_logits, y), train.Recipe(epochs=3, batch_size=64, augment=False),
                     loss_fn=loss, device=torch.device("cpu"))
    assert hist["loss"][-1] < hist["loss"][0]
    assert (train.predict(model, x).argmax(1) == 3).float().mean() > 0.9


def test_label_subset_and_teacher_labels():
    m0, m1 = distill.label_subset(1000, 0.1, seed=0), distill.label_subset(1000, 0.1, seed=1)
    assert m0.dtype == torch.bool and m0.sum() == 100 and not torch.equal(m0, m1)
    assert torch.equal(m0, distill.label_subset(1000, 0.1, seed=0))
    assert distill.label_subset(5, 0.01, seed=0).sum() == 1
    with pytest.raises(ValueError):
        distill.label_subset(10, 0.0, seed=0)
    y = torch.tensor([1, 1, 1])
    t = torch.tensor([[9.0, 0, 0], [0, 0, 9.0], [0, 9.0, 0]])
    out = distill.teacher_labels(y, t, torch.tensor([True, False, False]))
    assert out.tolist() == [1, 2, 1]


def test_macs_of_known_layers_and_the_student():
    conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)  # 4 out x 8x8 positions x (2 x 3 x 3)
    assert bench.count_macs(conv, torch.zeros(1, 2, 8, 8)) == 4 * 64 * 18
    dw = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)  # depthwise: 4 x 64 x 9
    assert bench.count_macs(dw, torch.zeros(1, 4, 8, 8)) == 4 * 64 * 9
    x = torch.zeros(1, 1, 32, 32)
    full, student, teacher = (models.build(a) for a in ("mobilenet_v2", models.ROLES["student"], "resnet50"))
    f, s, t = bench.count_macs(full, x), bench.count_macs(student, x), bench.count_macs(teacher, x)
    # default stems at 32x32: MobileNetV2 ~6.0 M MACs at width 1.0 and ~1.9 M at the student's 0.5,
    # ResNet50 ~82 M (the small-image stems of an earlier recipe cost ~24 M and ~1.3 G)
    assert 5.5e6 < f < 6.5e6 and 1.7e6 < s < 2.1e6 and 75e6 < t < 90e6


def test_gain_summary():
    g = distill.gain_summary([1.0, 3.0])
    assert (g["mean"], g["min"], g["max"], g["n"]) == (2.0, 1.0, 3.0, 2)
    assert g["std"] == pytest.approx(math.sqrt(2.0))
    with pytest.raises(ValueError):
        distill.gain_summary([])


def test_sizes_exist_for_every_profile_and_have_two_seeds():
    for profile in PROFILES.values():
        s = distill.sizes(profile)
        assert len(set(s.seeds)) >= 2 and s.epochs >= 1 and s.labels_per_class == tuple(sorted(s.labels_per_class))
        n_train = profile.train_images or 55_000
        assert max(s.labels_per_class) * 10 < n_train, "the few-label settings must leave unlabelled images"
    assert len(distill.sizes(PROFILES["full"]).seeds) >= 3, "issue 18: the full profile's gain is a mean over >= 3 seeds"


def test_labels_per_class_keeps_exactly_k_labels_of_every_class():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=torch.Generator().manual_seed(1))]
    mask = distill.labels_per_class(labels, 7, seed=3)
    assert mask.dtype == torch.bool and int(mask.sum()) == 70
    assert torch.bincount(labels[mask], minlength=10).tolist() == [7] * 10
    assert torch.equal(mask, distill.labels_per_class(labels, 7, seed=3))  # the seed decides the subset
    assert not torch.equal(mask, distill.labels_per_class(labels, 7, seed=4))
    with pytest.raises(ValueError, match="fewer than"):
        distill.labels_per_class(labels, 31, seed=0)
    with pytest.raises(ValueError):
        distill.labels_per_class(labels, 0, seed=0)


def test_sweep_plot_has_one_line_per_alpha():
    rows = [{"temperature": T, "alpha": a, "val_accuracy": 0.5} for T in (1.0, 4.0) for a in (0.5, 0.9)]
    fig = distill.plot_sweep(rows, baseline=0.4)
    assert len(fig.axes[0].get_lines()) == 3


def test_matched_epochs_give_the_same_number_of_steps():
    assert distill.matched_epochs(2, 12_000, 1_200) == 19  # 2 x 94 steps = 188 = ~19 x 10 steps
    assert distill.matched_epochs(1, 1024, 102) == 8  # 8 steps over 1 batch of 102
    assert distill.matched_epochs(3, 100, 100) == 3
    with pytest.raises(ValueError):
        distill.matched_epochs(1, 10, 20)


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_run_of_the_lesson_has_enough_steps_for_one_cycle(name):
    """The lesson's loop uses OneCycleLR (pct_start 0.25), which divides by zero below 5 optimiser steps."""
    p = PROFILES[name]
    s = distill.sizes(p)
    n_train = p.train_images or 55_000
    n_labeled = 10 * min(s.labels_per_class)
    steps = {
        "sweep": s.sweep_epochs * math.ceil(min(s.sweep_train_images, n_train) / 128),
        "distilled": s.epochs * math.ceil(n_train / 128),
        "few-label scratch": distill.matched_epochs(s.epochs, n_train, n_labeled) * math.ceil(n_labeled / 128),
    }
    assert min(steps.values()) >= 5, steps


def test_memory_format_follows_the_model_on_a_cpu():
    """Grouped (depthwise) convolutions train contiguous on a CPU, dense ones channels-last (measured: train.memory_format_for)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.memory_format_for(models.build("mobilenet_v2_x0_5"), cpu) == torch.contiguous_format
    assert train.memory_format_for(models.build("resnet50"), cpu) == torch.channels_last
    assert train.memory_format_for(models.build("mobilenet_v2_x0_5"), cuda) == torch.channels_last


def test_with_mirrored_view_pairs_each_view_with_its_own_logits():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    y = torch.tensor([3, 7])
    t, t_flip = torch.randn(2, 10), torch.randn(2, 10)
    xs, ys, ts = distill.with_mirrored_view(x, y, t, t_flip)
    assert xs.shape == (4, 1, 2, 3) and ys.tolist() == [3, 7, 3, 7]
    assert torch.equal(xs[:2], x) and torch.equal(xs[2:], x.flip(3)) and not torch.equal(xs[2:], x)
    assert torch.equal(ts[:2], t) and torch.equal(ts[2:], t_flip)
    with pytest.raises(ValueError, match="same images"):
        distill.with_mirrored_view(x, y[:1], t, t_flip)
    with pytest.raises(ValueError, match="differ in shape"):
        distill.with_mirrored_view(x, y, t, t_flip[:, :5])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        distill.with_mirrored_view(x[:, 0], y, t, t_flip)
