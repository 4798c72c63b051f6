import math

import pytest
import torch
from torch import nn

from deploylab import config, data, distill, models, prune, prune_scan, stats


def small_model() -> nn.Module:
    """A known model: conv 1->4 (3x3, 36 weights), BN, linear 4->3 (12 weights): 48 prunable weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def test_sparsity_accounting_on_a_known_model():
    m = small_model()
    with torch.no_grad():
        m[0].weight[:2] = 0  # 18 of the conv's 36 weights
        m[5].weight[0, :3] = 0  # 3 of the linear's 12 weights
    s = prune.sparsity(m)
    assert (s.zeros, s.total) == (21, 48)
    assert s.per_layer == {"0": 0.5, "5": 0.25}
    assert math.isclose(s.fraction, 21 / 48)


@pytest.mark.parametrize("amount, zeros", [(0.25, 12), (0.5, 24), (0.75, 36)])
def test_global_prune_zeroes_exactly_that_fraction_and_survives_remove(amount, zeros):
    m = small_model()
    prune.global_magnitude_prune(m, amount)
    assert prune.sparsity(m).zeros == zeros
    assert hasattr(m[0], "weight_mask")
    prune.make_permanent(m)
    assert not any(k.endswith(("_orig", "_mask")) for k in m.state_dict())
    assert prune.sparsity(m).zeros == zeros
    assert isinstance(m[0].weight, nn.Parameter)


def test_global_prune_removes_the_smallest_magnitudes_across_layers():
    m = small_model()
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[5].weight.fill_(0.01)  # the 12 smallest weights are all in the linear layer
    prune.global_magnitude_prune(m, 0.25)
    assert prune.sparsity(m).per_layer == {"0": 0.0, "5": 1.0}


def test_spared_layers_of_mobilenet_are_first_conv_depthwise_and_classifier():
    m = models.build("mobilenet_v2_x0_5")
    spared = prune.spared_layers(m)
    depthwise = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    assert spared == ["features.0.0", *depthwise, "classifier.1"]
    assert len(depthwise) == 17 and all(m.get_submodule(n).groups == m.get_submodule(n).in_channels for n in depthwise)
    assert "features.18.0" not in spared and "features.1.conv.1" not in spared  # pointwise convolutions are ranked


def collapsing_mobilenet() -> nn.Module:
    """A MobileNetV2 whose last 1x1 convolution has tiny weights: naive global ranking empties it."""
    torch.manual_seed(0)
    m = models.build("mobilenet_v2_x0_5")
    with torch.no_grad():
        m.get_submodule("features.18.0").weight.mul_(1e-3)
    return m


def test_naive_global_pruning_collapses_a_layer():
    s = prune.sparsity(prune.global_magnitude_prune(collapsing_mobilenet(), 0.5))
    assert s.per_layer["features.18.0"] == 1.0  # the whole layer is gone: the model predicts a constant


@pytest.mark.parametrize("amount, cap", [(0.5, 0.9), (0.8, 0.9), (0.9, 0.95)])
def test_fixed_pruning_spares_excluded_layers_and_respects_the_cap(amount, cap):
    m = collapsing_mobilenet()
    spared = prune.spared_layers(m)
    before = {n: m.get_submodule(n).weight.detach().clone() for n in spared}
    prune.global_magnitude_prune(m, amount, exclude=spared, max_layer_sparsity=cap)
    s = prune.sparsity(m)
    assert all(s.per_layer[n] == 0.0 and not hasattr(m.get_submodule(n), "weight_mask") for n in spared)
    assert all(torch.equal(m.get_submodule(n).weight, before[n]) for n in spared)
    assert max(s.per_layer.values()) <= cap and s.per_layer["features.18.0"] == pytest.approx(cap, abs=1e-4)
    ranked = s.total - sum(before[n].numel() for n in spared)
    assert s.zeros == round(amount * ranked)  # amount is the fraction of the ranked weights...
    assert s.fraction < amount  # ...so the model-wide sparsity is lower


def test_cap_redistributes_to_the_other_layers():
    m = small_model()
    with torch.no_grad():
        m[0].weight.copy_(torch.arange(1, 37, dtype=torch.float32).view(4, 1, 3, 3))
        m[5].weight.fill_(0.01)  # uncapped, the 12 smallest weights are the linear layer's
    prune.global_magnitude_prune(m, 0.25, max_layer_sparsity=0.5)
    assert prune.sparsity(m).per_layer == {"0": 6 / 36, "5": 0.5}
    assert torch.equal(m[0].weight_mask.flatten() == 0, torch.arange(36) < 6)  # the conv's smallest six go


def test_fixed_pruning_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="prune less or raise the cap"):
        prune.global_magnitude_prune(small_model(), 0.9, max_layer_sparsity=0.9)  # 0.9 of 12 and 36 rounds down
    with pytest.raises(ValueError, match="prune less or raise the cap"):
        prune.global_magnitude_prune(small_model(), 0.6, max_layer_sparsity=0.5)
    with pytest.raises(ValueError, match="lacks"):
        prune.global_magnitude_prune(small_model(), 0.5, exclude=["nope"])
    with pytest.raises(ValueError, match="all are excluded"):
        prune.global_magnitude_prune(small_model(), 0.5, exclude=["0", "5"])
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        prune.global_magnitude_prune(small_model(), 0.5, max_layer_sparsity=1.0)


def test_ratio_zero_is_a_noop_and_one_is_refused():
    m = small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    prune.global_magnitude_prune(m, 0.0)
    prune.make_permanent(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="remove every weight"):
        prune.global_magnitude_prune(small_model(), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune.global_magnitude_prune(small_model(), -0.1)
    with pytest.raises(TypeError, match="number"):
        prune.global_magnitude_prune(small_model(), "0.5")
    with pytest.raises(ValueError, match="prunes nothing"):
        prune.check_amount(0, allow_zero=False)


def test_structured_ratio_edge_cases():
    m = models.build("mobilenet_v2").eval()
    ex = torch.zeros(1, 1, 32, 32)
    layer = prune_scan.scan_layers(m, 1)[0]
    channels = m.get_submodule(layer).out_channels
    assert prune_scan.prune_layer_channels(m, layer, 0.0, ex) == 0
    assert m.get_submodule(layer).out_channels == channels
    with pytest.raises(ValueError, match="remove every weight"):
        prune_scan.prune_layer_channels(m, layer, 1.0, ex)
    removed = prune_scan.prune_layer_channels(m, layer, 0.5, ex)
    conv = m.get_submodule(layer)
    assert removed == channels // 2 and conv.out_channels == channels - removed
    with torch.inference_mode():
        assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 10)  # the dependency graph shrank the consumers too


def test_storage_sizes_only_shrink_when_compressed_or_sparse():
    m = models.build("mobilenet_v2")
    dense0 = prune.storage_sizes(m)
    prune.global_magnitude_prune(m, 0.9)
    with pytest.raises(RuntimeError, match="make_permanent"):
        prune.storage_sizes(m)
    prune.make_permanent(m)
    s = prune.storage_sizes(m)
    assert abs(s["dense"] - dense0["dense"]) < 0.01 * dense0["dense"]  # same bytes: zeros are floats too
    assert s["gzip"] < 0.4 * s["dense"] and s["sparse_csr"] < 0.7 * s["dense"]
    assert dense0["sparse_csr"] > dense0["dense"]  # a dense model stored as CSR grows (indices cost 8 bytes)


def test_macs_fall_when_channels_are_removed():
    m = models.build("mobilenet_v2").eval()
    ex = torch.zeros(1, 1, 32, 32)
    macs0, params0 = prune.macs_and_params(m, ex)
    assert params0 == models.count_parameters(m)
    prune_scan.prune_layer_channels(m, prune_scan.scan_layers(m, 1)[0], 0.5, ex)
    macs1, params1 = prune.macs_and_params(m, ex)
    assert macs1 < macs0 and params1 < params0


def _score(delta: float, half_width: float, accuracy: float = 0.9) -> stats.Score:
    """A paired comparison with the dense model: ``delta`` points, 95% interval ``delta +- half_width``."""
    return stats.Score(2000, accuracy, (accuracy - 0.01, accuracy + 0.01), 0.98, delta, (delta - half_width, delta + half_width))


def test_sensitivity_scan_on_validation_images_and_ratio_choice():
    m = models.build("mobilenet_v2").eval()
    x_val, y_val = data.tensors("val", 64)
    ex = x_val[:1]
    layers = prune_scan.scan_layers(m, 2)
    assert len(layers) == 2 and layers[0] != layers[1]
    scan = prune_scan.sensitivity_scan(m, layers, [0.25, 0.5], ex, x_val, y_val, resamples=100)
    assert set(scan) == set(layers) and set(scan[layers[0]]) == {0.25, 0.5}
    assert all(s.images == 64 and 0 <= s.accuracy <= 1 for per in scan.values() for s in per.values())
    assert m.get_submodule(layers[0]).out_channels == 96  # pruned copies, not the original
    with pytest.raises(data.TestImagesError):
        prune_scan.sensitivity_scan(m, layers, [0.25], ex, *data.tensors("test", 64))
    with pytest.raises(ValueError):
        prune_scan.scan_layers(m, 0)


def test_ratios_from_scan_keep_the_smaller_change_when_the_interval_reaches_past_the_bound():
    scan = {"a": {0.25: _score(-0.5, 0.5), 0.5: _score(-1.5, 0.4)},  # 0.5 surely loses < 2 points
            "b": {0.25: _score(-1.5, 1.0), 0.5: _score(-1.8, 0.1)},  # 0.25 may lose 2.5 points; 0.5 surely < 2
            "c": {0.25: _score(-5.0, 0.5)}}  # surely too much: nothing
    assert prune_scan.ratios_from_scan(scan, max_drop_points=2.0) == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert prune_scan.ratios_from_scan({"b": {0.25: _score(-1.5, 1.0)}}, max_drop_points=2.0) == {"b": 0.0}
    with pytest.raises(ValueError):
        prune_scan.ratios_from_scan(scan, max_drop_points=-1)


def test_choose_saved_picks_the_fastest_surely_within_tolerance_else_the_most_accurate():
    scores = {"ch-25%": _score(-0.3, 0.4), "ch-50%": _score(-0.8, 0.5), "guided": _score(-0.2, 0.3)}
    p50 = {"ch-25%": 2.0, "ch-50%": 1.0, "guided": 1.5}
    name, rule = prune_scan.choose_saved(scores, p50, tolerance_points=1.0)
    assert name == "guided" and "validation" in rule  # ch-50% is faster but may lose 1.3 points
    worse = {"ch-25%": _score(-3.0, 0.5, 0.87), "ch-50%": _score(-4.0, 0.5, 0.86)}
    name, rule = prune_scan.choose_saved(worse, p50, tolerance_points=1.0)
    assert name == "ch-25%" and "most accurate" in rule


def test_validation_scores_pair_with_the_dense_model_and_refuse_test_images():
    m = models.build("mobilenet_v2").eval()
    x_val, y_val = data.tensors("val", 32)
    scores = prune_scan.validation_scores({"same": m}, m, x_val, y_val, resamples=50)
    assert scores["same"].agreement == 1.0 and scores["same"].delta_interval == (0.0, 0.0)
    with pytest.raises(data.TestImagesError):
        prune_scan.validation_scores({"same": m}, m, *data.tensors("test", 32))


def test_pruned_model_roundtrip_and_tamper(tmp_path):
    import torch_pruning as tp

    m = models.build("mobilenet_v2").eval()
    ex = torch.zeros(1, 1, 32, 32)
    pruner = tp.pruner.BasePruner(m, ex, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                  ignored_layers=[prune.classifier(m)])
    pruner.step()
    meta = prune.save_pruned(m, tmp_path, "student_pruned", {"arch": "mobilenet_v2", "profile": "smoke"})
    loaded, got = prune.load_pruned(tmp_path, "student_pruned", profile="smoke")
    assert got["sha256"] == meta["sha256"]
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), m(x))
    assert models.count_parameters(loaded) < 0.5 * models.count_parameters(models.build("mobilenet_v2"))
    with pytest.raises(models.CheckpointError, match="not 'full'"):
        prune.load_pruned(tmp_path, "student_pruned", profile="full")
    pt = tmp_path / "student_pruned.pt"
    raw = bytearray(pt.read_bytes())
    raw[-100] ^= 0xFF
    pt.write_bytes(bytes(raw))
    with pytest.raises(models.CheckpointError, match="sha256"):
        prune.load_pruned(tmp_path, "student_pruned", profile="smoke")
    with pytest.raises(ValueError, match="overwrite"):
        prune.save_pruned(m, tmp_path, "student", {"arch": "mobilenet_v2", "profile": "smoke"})


def test_sizes_per_profile():
    for profile in config.PROFILES.values():
        s = prune.sizes(profile)
        assert all(0 < x < 1 for x in (*s.sparsities, *s.student_ratios, s.teacher_ratio, *s.sensitivity_ratios))
        assert max(s.sparsities) < s.max_layer_sparsity < 1  # the capped sweep must be feasible
        limit = profile.train_images or data.split_size("train")  # fine-tunes take prefixes of these
        for n in (s.finetune_images, s.step_images, s.student_finetune_images, s.teacher_finetune_images):
            assert n is None or n <= limit
        if profile.name != "smoke":  # DESIGN: workshop and full score every variant on the whole test set
            assert s.teacher_eval_images is None and profile.test_images is None


def test_finetune_keeps_pruned_weights_at_zero():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    prune.global_magnitude_prune(m, 0.6)
    zeros = prune.sparsity(m).zeros
    mask = m[0].weight_mask.clone()
    before = m[0].weight_orig.detach().clone()
    x, y = data.tensors("train", 64)  # 8 steps of 8 images
    prune.finetune(m, x, y, epochs=1, lr=0.05, augment=False, desc="test")
    assert not m.training
    assert not torch.equal(m[0].weight_orig, before), "the fine-tune should have changed the weights"
    assert torch.equal(m[0].weight_mask, mask) and prune.sparsity(m).zeros >= zeros
    assert torch.all(m[0].weight[mask == 0] == 0)


@pytest.mark.parametrize("images, epochs, batch", [(64, 1, 8), (256, 1, 32), (4096, 1, 128), (55_000, 2, 128), (40, 1, 8)])
def test_finetune_batch_size_gives_enough_steps(images, epochs, batch):
    assert prune.finetune_batch_size(images, epochs) == batch


def test_finetune_refuses_too_few_steps():
    with pytest.raises(ValueError, match="at least 40 images"):
        prune.finetune_batch_size(32, 1)
    with pytest.raises(ValueError, match="one epoch"):
        prune.finetune_batch_size(1000, 0)


def test_finetune_with_teacher_logits_distils(monkeypatch):
    seen = {}

    def fake_fit(model, x, targets, recipe, *, loss_fn=None, desc="", bar=None):
        seen.update(targets=targets, loss_fn=loss_fn, recipe=recipe)

    monkeypatch.setattr(prune, "fit", fake_fit)
    x, y = torch.zeros(64, 1, 32, 32), torch.arange(64) % 10
    teacher = torch.randn(64, 10)
    prune.finetune(small_model(), x, y, epochs=1, lr=0.02, augment=False, teacher_logits=teacher)
    assert isinstance(seen["loss_fn"], distill.DistillationLoss)
    assert torch.equal(seen["targets"], distill.pack_targets(teacher, y)) and seen["recipe"].lr == 0.02
    prune.finetune(small_model(), x, y, epochs=1, lr=0.01, augment=False)
    assert seen["loss_fn"] is None and torch.equal(seen["targets"], y)  # no teacher: fit's cross-entropy


def test_finetune_steps_match_the_batch_size():
    assert prune.finetune_steps(4096, 1) == 32
    assert prune.finetune_steps(55_000, 4) == 4 * 430
    assert prune.finetune_steps(64, 1) == 8


def test_channel_multiple_is_the_fp32_vector_width_of_the_cpu():
    assert prune.channel_multiple({"avx2": True, "avx512f": True}) == 16
    assert prune.channel_multiple({"avx2": True, "avx512f": False}) == 8
    assert prune.channel_multiple({}) == 8


def test_recalibrate_batchnorm_reestimates_statistics_only():
    m = models.build("mobilenet_v2").eval()
    x, _ = data.tensors("train", 64)
    bn = next(mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    weights = {k: v.clone() for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    out = prune_scan.recalibrate_batchnorm(m, x, batch_size=32)
    assert out is m and not m.training
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and bn.momentum is None
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in weights.items()), "no weight changes"
