import json

import pytest
import torch
from torch import nn

from deploylab import bench, config, data, quantize


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_sizes_exist_for_every_profile():
    assert set(quantize.SIZES) == set(config.PROFILES)
    for name, s in quantize.SIZES.items():
        assert s.name == name and s.keep_float >= 1
        assert s.qat_images >= s.qat_batch_size and s.teacher_qat_images >= s.qat_batch_size, "QAT needs a full batch"
        assert all(n >= 1 for n in s.calibration_sweep)
    assert quantize.sizes(config.PROFILES["smoke"]) is quantize.SIZES["smoke"]


def test_workshop_and_full_measure_the_teacher_on_the_whole_test_set():
    """DESIGN: accuracy in workshop and full is measured on all 10,000 test images, for every variant."""
    for name in ("workshop", "full"):
        assert quantize.SIZES[name].teacher_eval_images is None
        assert config.PROFILES[name].test_images is None


def test_int8_instructions_and_reduce_range_follow_the_cpu_flags():
    none = dict.fromkeys(("avx2", "avx512_vnni", "avx_vnni", "amx_int8"), False)
    avx2 = {**none, "avx2": True}
    assert quantize.int8_instructions(avx2) == "AVX2 without VNNI" and quantize.needs_reduce_range(avx2)
    assert quantize.int8_instructions(none) == "no AVX2" and quantize.needs_reduce_range(none)
    for flag, name in (("avx_vnni", "AVX-VNNI"), ("avx512_vnni", "AVX-512 VNNI"), ("amx_int8", "AMX")):
        flags = {**avx2, flag: True}
        assert quantize.int8_instructions(flags) == name and not quantize.needs_reduce_range(flags)
    assert quantize.int8_instructions({**avx2, "avx512_vnni": True, "amx_int8": True}) == "AMX"


def test_per_tensor_weights_changes_only_the_weight_scheme_and_refuses_qat():
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import get_default_x86_inductor_quantization_config

    base = get_default_x86_inductor_quantization_config(reduce_range=True)
    pt = quantize.per_tensor_weights(base)
    assert base.weight.qscheme == torch.per_channel_symmetric and pt.weight.qscheme == torch.per_tensor_symmetric
    assert pt.input_activation == base.input_activation and pt.input_activation.quant_max == 127
    with pytest.raises(quantize.QuantizationError, match="per-channel"):
        quantize.per_tensor_weights(get_default_x86_inductor_quantization_config(is_qat=True))


def test_fake_quant_weight_per_tensor_uses_one_scale_and_loses_small_channels():
    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-0.01, 0.01, 9)]).reshape(2, 1, 3, 3)
    per_channel = quantize._fake_quant_weight(w, per_channel=True)
    per_tensor = quantize._fake_quant_weight(w, per_channel=False)
    half_step = w.abs().flatten(1).amax(1) / 254  # each channel gets its own scale: max / 127
    assert ((per_channel - w).abs().flatten(1).amax(1) <= half_step + 1e-7).all()
    assert torch.unique(per_tensor[1]).numel() <= 3  # the small channel falls into ~2 steps of the big one's scale
    assert (per_tensor[1] - w[1]).abs().max() > 10 * (per_channel[1] - w[1]).abs().max()


def test_depthwise_layers_are_found():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2))
    assert quantize.depthwise_layers(model) == {"0"}


def test_recovered_says_what_a_fix_won_back():
    assert quantize.recovered(0.90, 0.88, 0.89) == "it won back 1.00 of the 2.00 points (1.00 below fp32 after)"
    assert quantize.recovered(0.90, 0.88, 0.87).startswith("it won back nothing")
    assert quantize.recovered(0.90, 0.88, 0.91) == "it won back all 2.00 points (+1.00 against fp32 after)"
    assert quantize.recovered(0.90, 0.905, 0.89).startswith("there was nothing to win back (+0.50")


def test_loss_trend_and_top1_agreement():
    assert quantize.loss_trend([4.0, 3.0, 2.0, 1.0], window=2) == (3.5, 1.5)
    assert quantize.loss_trend([2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError):
        quantize.loss_trend([])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [3.0, 1.0], [0.5, 0.0]])
    assert quantize.top1_agreement(a, b) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        quantize.top1_agreement(a, b[:2])


def test_calibration_without_images_is_a_clear_error():
    prepared = small_cnn()
    with pytest.raises(ValueError, match="no images"):
        quantize.calibrate(prepared, [])
    with pytest.raises(ValueError, match="no images"):
        quantize.calibrate(prepared, quantize.batches_of(torch.zeros(0, 1, 8, 8), 4))


def test_calibration_counts_images_and_rejects_non_tensors():
    seen = []
    model = nn.Identity()
    model.register_forward_hook(lambda m, a, o: seen.append(len(a[0])))
    assert quantize.calibrate(model, quantize.batches_of(torch.zeros(10, 1, 4, 4), 4)) == 10
    assert seen == [4, 4, 2]
    with pytest.raises(TypeError):
        quantize.calibrate(model, [[1, 2, 3]])


def test_unsupported_layer_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LSTM(4, 4))
    with pytest.raises(quantize.UnsupportedLayerError, match=r"2 \(LSTM\)"):
        quantize.check_quantizable(model)
    with pytest.raises(TypeError):
        quantize.check_quantizable("not a model")
    quantize.check_quantizable(small_cnn())  # supported: no error


def test_untie_relus_keeps_the_maths_and_makes_resnet_quantizable():
    from deploylab import models

    model = models.build("resnet50").eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
        untied = quantize.untie_relus(model)
        after = untied(x)
    assert torch.allclose(before, after)
    block = untied.layer1[0]
    assert not hasattr(block, "relu") and block.relu1 is not block.relu2


def test_predict_fixed_pads_to_one_shape():
    shapes = []

    def fn(x):
        shapes.append(tuple(x.shape))
        return x.flatten(1)[:, :3]

    x = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 1, 2, 2)
    out = quantize.predict_fixed(fn, x, batch_size=2)
    assert shapes == [(2, 1, 2, 2)] * 3
    assert torch.equal(out, x.flatten(1)[:, :3])
    with pytest.raises(ValueError):
        quantize.predict_fixed(fn, x[:0])


def test_evenly_spaced():
    items = [str(i) for i in range(10)]
    assert quantize.evenly_spaced(items, 3) == ["0", "4", "9"] or quantize.evenly_spaced(items, 3) == ["0", "5", "9"]
    assert quantize.evenly_spaced(items, None) == items
    assert quantize.evenly_spaced(items, 20) == items
    with pytest.raises(ValueError):
        quantize.evenly_spaced(items, 0)


def test_macs_count_conv_and_linear():
    macs = bench.macs_by_layer_type(small_cnn(), torch.zeros(1, 1, 8, 8))
    assert macs == {"Conv2d": 8 * 8 * 8 * 9, "Linear": 8 * 10}


def test_sensitivity_runs_on_real_images_and_ranks_layers():
    x, y = data.tensors("val", 64)
    model = small_cnn()
    out = quantize.layer_sensitivity(model, x, y, data.calibration_set(16))
    assert set(out) == {"0", "5"} and all(0.0 <= a <= 1.0 for a in out.values())
    per_tensor = quantize.layer_sensitivity(model, x, y, data.calibration_set(16), per_channel=False, reduce_range=True)
    assert set(per_tensor) == {"0", "5"}
    with pytest.raises(ValueError):
        quantize.layer_sensitivity(model, x, y, data.calibration_set(16), ["nope"])


def test_sensitivity_refuses_test_images():
    x, y = data.tensors("test", 64)
    with pytest.raises(data.TestImagesError):
        quantize.layer_sensitivity(small_cnn(), x, y, data.calibration_set(16))


def test_most_sensitive_are_the_lowest_accuracies():
    scan = {"a": 0.90, "b": 0.80, "c": 0.88, "d": 0.91}
    assert quantize.most_sensitive(scan, 2) == ["b", "c"]
    assert quantize.most_sensitive(scan, 0) == []


def _oracle(x_val: torch.Tensor, y_val: torch.Tensor, wrong: int):
    """A "model" that looks each image up in x_val and answers its label, wrong on the first ``wrong`` images."""
    answers = y_val.clone()
    answers[:wrong] = (answers[:wrong] + 1) % 10

    def fn(xb: torch.Tensor) -> torch.Tensor:
        idx = torch.cdist(xb.flatten(1), x_val.flatten(1)).argmin(1)
        return torch.nn.functional.one_hot(answers[idx], 10).float()

    return fn


def test_float_layers_are_kept_only_when_they_win_beyond_noise():
    x_val, y_val = data.tensors("val", 400)
    all_int8 = _oracle(x_val, y_val, wrong=100)
    clear = quantize.choose_keep_float(all_int8, _oracle(x_val, y_val, wrong=0), ["a", "b"], x_val, y_val, resamples=300)
    assert clear.kept == ("a", "b") and clear.comparison.delta_points == pytest.approx(25.0)
    noise = quantize.choose_keep_float(all_int8, _oracle(x_val, y_val, wrong=98), ["a", "b"], x_val, y_val, resamples=300)
    assert noise.kept == () and noise.candidates == ("a", "b"), "2 images in 400 are noise: the simpler model stays"
    assert "within noise" in noise.sentence() and "keep none" in noise.sentence()
    x_test, y_test = data.tensors("test", 400)
    with pytest.raises(data.TestImagesError):
        quantize.choose_keep_float(all_int8, all_int8, ["a"], x_test, y_test)


def test_static_ptq_save_load_and_refuse_tampering(tmp_path):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    model = small_cnn()
    calib = data.calibration_set(8)
    exported = quantize.export_for_quantization(model, calib)
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    assert quantize.calibrate(prepared, quantize.batches_of(calib, 4)) == 8
    converted = quantize.allow_eval(convert_pt2e(prepared))
    with torch.no_grad():
        ref = converted(calib)
    meta = quantize.save_program(converted, calib, tmp_path, "tiny_int8", {"profile": "smoke"})
    assert (tmp_path / "tiny_int8.pt2").stat().st_size == meta["size_bytes"]
    loaded, meta2 = quantize.load_program(tmp_path, "tiny_int8", profile="smoke")
    with torch.no_grad():
        assert torch.allclose(loaded(calib), ref, atol=1e-5)
    assert meta2["sha256"] == meta["sha256"] and meta2["data_sha256"] == data.DATA_SHA256
    with pytest.raises(quantize.QuantizationError, match="profile"):
        quantize.load_program(tmp_path, "tiny_int8", profile="full")
    path = tmp_path / "tiny_int8.pt2"
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(quantize.QuantizationError, match="sha256"):
        quantize.load_program(tmp_path, "tiny_int8", profile="smoke")
    with pytest.raises(quantize.QuantizationError, match="no complete"):
        quantize.load_program(tmp_path, "missing", profile="smoke")
    with pytest.raises(ValueError):
        quantize.save_program(converted, calib, tmp_path, "student", {"profile": "smoke"})
    assert json.loads((tmp_path / "tiny_int8.json").read_text())["file"] == "tiny_int8.pt2"


def test_export_rejects_a_single_image_example():
    with pytest.raises(ValueError, match="N>=2"):
        quantize.export_for_quantization(small_cnn(), torch.zeros(1, 1, 8, 8))


def test_qat_finetune_checks_its_inputs():
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="full batch"):
        quantize.qat_finetune(small_cnn(), x, y, batch_size=8, lr=0.1)
    with pytest.raises(ValueError, match="soft_targets"):
        quantize.qat_finetune(small_cnn(), x, y, batch_size=2, lr=0.1, soft_targets=torch.zeros(3, 10))
    with pytest.raises(ValueError, match="freeze"):
        quantize.qat_finetune(small_cnn(), x, y, batch_size=2, lr=0.1, freeze_bn_at=0.9, freeze_observers_at=0.5)


def qat_prepared(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True, reduce_range=True))
    return prepare_qat_pt2e(quantize.export_for_quantization(model, example, train=True), quantizer)


def test_qat_finetune_distils_freezes_observers_and_batch_norm_and_converts():
    from torchao.quantization.pt2e import FakeQuantizeBase
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    x, y = data.tensors("train", 64)
    model = small_cnn()
    with torch.no_grad():
        soft = model(x)
    prepared = qat_prepared(model, x[:8])
    losses = quantize.qat_finetune(prepared, x, y, batch_size=16, lr=1e-3, soft_targets=soft)
    assert len(losses) == 4 and all(0.0 <= v < 1.0 for v in losses), losses  # KD to its own fp32 logits: small
    fakes = [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]
    assert fakes and all(int(m.observer_enabled[0]) == 0 for m in fakes), "observers must be frozen at the end"
    with torch.no_grad():  # batch norm in its eval form: an image's output does not depend on the rest of the batch
        assert torch.allclose(prepared(x[:8])[:1], prepared(x[:1]), atol=1e-5)
    converted = quantize.allow_eval(convert_pt2e(prepared))
    with torch.no_grad():
        assert converted(x[:4]).shape == (4, 10)
    ce = quantize.qat_finetune(qat_prepared(model, x[:8]), x, y, batch_size=16, lr=1e-3)
    assert len(ce) == 4 and min(ce) > max(losses), "without soft targets the loss is the cross-entropy on the labels"


def test_program_bytes_does_not_carry_the_storage_of_a_sliced_example():
    """torch.save keeps a view's whole storage: a program exported with x[:32] of the test set
    once weighed 44 MB instead of 3 (the test set rode along as its example input)."""
    model = small_cnn().eval()
    images = data.tensors("test", 2048)[0]
    from_slice = len(quantize.program_bytes(model, images[:32]))
    from_copy = len(quantize.program_bytes(model, images[:32].clone()))
    assert from_slice == from_copy
    assert from_slice < images.numel() * images.element_size() / 4


def test_allow_eval_of_a_ptq_model_does_not_reset_compiled_code(monkeypatch):
    """The first .eval() of a converted model resets torch.compile's caches (torchao rewrites the graph
    with a strict export); a PTQ graph exported in eval mode needs no rewrite, so allow_eval skips it."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    calib = data.calibration_set(8)

    def converted():
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(quantize.export_for_quantization(small_cnn(), calib), quantizer)
        quantize.calibrate(prepared, quantize.batches_of(calib, 4))
        return convert_pt2e(prepared)

    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset())[1])
    rewritten = quantize.allow_eval(converted())
    assert resets, "the rewrite path is expected to reset dynamo (if not, torchao changed: revisit allow_eval)"
    resets.clear()
    marked = quantize.allow_eval(converted(), exported_in_eval_mode=True)
    marked.eval()
    marked.eval()
    assert resets == []
    assert not marked.training
    with torch.no_grad():
        assert torch.equal(marked(calib), rewritten(calib))
    with pytest.raises(quantize.QuantizationError, match="exported from model.eval"):
        marked.train()
