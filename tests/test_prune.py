import math

import pytest
import torch
from torch import nn

from deploylab import config, models, prune


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
    layer = prune.scan_layers(m, 1)[0]
    channels = m.get_submodule(layer).out_channels
    assert prune.prune_layer_channels(m, layer, 0.0, ex) == 0
    assert m.get_submodule(layer).out_channels == channels
    with pytest.raises(ValueError, match="remove every weight"):
        prune.prune_layer_channels(m, layer, 1.0, ex)
    removed = prune.prune_layer_channels(m, layer, 0.5, ex)
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
    prune.prune_layer_channels(m, prune.scan_layers(m, 1)[0], 0.5, ex)
    macs1, params1 = prune.macs_and_params(m, ex)
    assert macs1 < macs0 and params1 < params0


def test_sensitivity_scan_and_ratio_choice():
    m = models.build("mobilenet_v2").eval()
    ex = torch.zeros(1, 1, 32, 32)
    layers = prune.scan_layers(m, 2)
    assert len(layers) == 2 and layers[0] != layers[1]
    scan = prune.sensitivity_scan(m, layers, [0.25, 0.5], ex, score=lambda mm: mm.get_submodule(layers[0]).out_channels / 1000)
    assert set(scan) == set(layers) and set(scan[layers[0]]) == {0.25, 0.5}
    assert scan[layers[0]][0.5] < scan[layers[0]][0.25]  # the scanned layer really shrank
    assert m.get_submodule(layers[0]).out_channels == 96  # ...on a copy, not on the original
    chosen = prune.ratios_from_scan({"a": {0.25: 0.90, 0.5: 0.85}, "b": {0.25: 0.70}}, baseline=0.91, max_drop=0.02)
    assert chosen == {"a": 0.25, "b": 0.0}
    with pytest.raises(ValueError):
        prune.scan_layers(m, 0)


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


def test_finetune_keeps_pruned_weights_at_zero():
    from deploylab import data

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
