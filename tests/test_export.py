"""Unit tests of deploylab.export: export, verify (passing and failing), calibration reader, cards.

They use a small real convolutional network (a few thousand parameters) and real Fashion-MNIST
test images, so they take seconds; the lesson exports the real teacher and student.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from deploylab import config, data, export, onnx_int8, onnxrt


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, data.NUM_CLASSES),
    ).eval()


@pytest.fixture(scope="module")
def images():
    x, y = data.tensors("test", 64)
    return x, y


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images):
    model = tiny_net()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    info = export.export_onnx(model, path, example=images[0][:2])
    return model, info


def test_dynamo_export_has_named_io_dynamic_batch_and_one_file(exported):
    _, info = exported
    assert info.exporter == "dynamo" and info.opset >= 18
    assert info.files == ("tiny.onnx",), "weights must be inside the .onnx file (no external data)"
    d = export.describe(info.path)
    assert [i["name"] for i in d["inputs"]] == ["input"] and [o["name"] for o in d["outputs"]] == ["logits"]
    assert isinstance(d["inputs"][0]["shape"][0], str), "the batch dimension must be symbolic"
    assert d["inputs"][0]["shape"][1:] == [1, 32, 32] and d["outputs"][0]["shape"][1:] == [10]


def test_external_data_is_detected(tmp_path, images):
    # torch.onnx.export's own default (dynamo, external_data=True) writes the weights beside the graph
    torch.onnx.export(tiny_net(), (images[0][:2],), tmp_path / "split.onnx", dynamo=True)
    assert export.external_data_files(tmp_path / "split.onnx") == ("split.onnx.data",)


def test_export_prints_no_progress_lines(tmp_path, images, capsys):
    export.export_onnx(tiny_net(), tmp_path / "quiet.onnx", example=images[0][:2])
    out = capsys.readouterr().out
    assert export.PROGRESS_PREFIX not in out, out


def test_exporter_quiet_drops_only_progress_lines(capsys):
    with pytest.warns(UserWarning, match="a real warning"), export.exporter_quiet():
        print("[torch.onnx] Run decompositions... ✅")
        print("a line of the caller's")
        print("[torch.onnx] Translate the graph into ONNX... ❌")
        warnings.warn("a real warning", UserWarning, stacklevel=1)
    assert capsys.readouterr().out == "a line of the caller's\n[torch.onnx] Translate the graph into ONNX... ❌\n"


def test_legacy_export_is_opset_13(tmp_path, images):
    info = export.export_onnx(tiny_net(), tmp_path / "legacy.onnx", example=images[0][:2], dynamo=False)
    assert info.exporter == "legacy" and info.opset == 13
    sess = onnxrt.session(info.path)
    assert onnxrt.run(sess, images[0][:5]).shape == (5, 10)


def test_verify_passes_and_runs_any_batch_size(exported, images):
    model, info = exported
    x, y = images
    result = export.verify(info.path, x, model, y)
    assert result.images == len(x) and result.top1_agreement == 1.0
    assert result.max_abs_diff <= result.tolerance and result.accuracy == result.reference_accuracy
    sess = onnxrt.session(info.path)
    for b in (1, 7, 32):  # dynamic batch: every size runs
        assert onnxrt.run(sess, x[:b]).shape == (b, 10)


def test_verify_raises_on_broken_parity(exported, images):
    model, info = exported
    x, _ = images
    wrong = x * data.STD + data.MEAN  # forgot to normalise: the reference sees different inputs
    with torch.inference_mode():
        ref = model(wrong)
    with pytest.raises(export.ParityError, match="does not reproduce PyTorch"):
        export.verify(info.path, x, ref)


def test_verify_catches_a_single_disagreement(exported, images):
    model, info = exported
    x, _ = images
    with torch.no_grad():
        ref = model(x)
    i = 0
    top2 = ref[i].topk(2).indices
    ref[i, top2[1]] = ref[i, top2[0]] + 1e-3  # tiny change that flips one top-1 prediction
    with pytest.raises(export.ParityError, match="agreement"):
        export.verify(info.path, x, ref, atol=1.0, rtol=0.0)


def test_checker_rejects_corrupt_and_invalid_graphs(tmp_path, exported):
    export.check_model(exported[1].path)  # the good one passes
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(export.ExportError, match="not a valid ONNX model"):
        export.check_model(bad)
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["missing"], ["y"])  # reads a tensor nobody produces
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "dangling.onnx")
    with pytest.raises(export.ExportError, match="topologically sorted"):
        export.check_model(tmp_path / "dangling.onnx")


def test_bad_inputs_get_clear_errors(exported, images):
    model, info = exported
    with pytest.raises(ValueError, match="empty"):
        export.verify(info.path, images[0][:0], model)
    with pytest.raises(TypeError, match="float32"):
        onnxrt.run(onnxrt.session(info.path), images[0].double())
    with pytest.raises(ValueError, match=r"\*\.onnx"):
        export.export_onnx(model, info.path.with_suffix(".bin"))
    with pytest.raises(TypeError, match="nn.Module"):
        export.export_onnx(lambda x: x, info.path)
    with pytest.raises(ValueError, match="optimization"):
        onnxrt.session(info.path, optimization="max")


def test_calibration_reader_feeds_all_images_then_none():
    cal = data.calibration_set(10)
    reader = onnx_int8.CalibrationReader(cal, batch_size=4)
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(len(batch["input"]))
    assert sizes == [4, 4, 2] and len(reader) == 3 and reader.batches_read == 3
    reader.rewind()
    assert np.array_equal(reader.get_next()["input"], cal[:4].numpy())


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(0, 1, 32, 32), "no images"),
    (torch.zeros(4, 32, 32), r"\(N, C, H, W\)"),
    (torch.full((2, 1, 32, 32), float("nan")), "NaN"),
])
def test_calibration_reader_refuses_bad_data(bad, match):
    with pytest.raises(ValueError, match=match):
        onnx_int8.CalibrationReader(bad)


def test_static_int8_quantizes_and_stays_close(exported, images, tmp_path):
    model, info = exported
    x, _ = images
    reader = onnx_int8.CalibrationReader(data.calibration_set(32), batch_size=16)
    out = onnx_int8.quantize_int8(info.path, tmp_path / "tiny_int8.onnx", reader, onnx_int8.Int8Config("qdq", True))
    assert reader.batches_read == 2
    ops = export.describe(out)["op_types"]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    q = onnxrt.run(onnxrt.session(out), x)
    ref = onnxrt.run(onnxrt.session(info.path), x)
    assert q.shape == ref.shape and (q.argmax(1) == ref.argmax(1)).mean() >= 0.8
    assert not np.array_equal(q, ref), "an INT8 model that equals fp32 bit for bit was not quantized"
    qop = onnx_int8.quantize_int8(info.path, tmp_path / "tiny_qop.onnx", reader, onnx_int8.Int8Config("qoperator", False))
    assert "QLinearConv" in export.describe(qop)["op_types"]


def test_card_roundtrip_and_sha_mismatch_is_refused(exported, images, tmp_path):
    model, info = exported
    x, y = images
    path = tmp_path / "tiny_fp32.onnx"
    path.write_bytes(info.path.read_bytes())
    p = config.PROFILES["smoke"]
    result = export.verify(path, x, model, y)
    card = export.write_card(path, role="student", arch="tiny", profile=p, precision="fp32", exporter="dynamo",
                             parity=result, accuracy=result.accuracy, test_images=len(x))
    assert export.card_path(path).name == "tiny_fp32.card.json"
    saved = json.loads(export.card_path(path).read_text())
    assert saved["sha256"] == card["sha256"] and saved["opset"] >= 18
    assert saved["inputs"][0]["name"] == "input" and saved["class_names"] == list(data.CLASS_NAMES)
    assert saved["preprocessing"]["mean"] == data.MEAN and saved["parity"]["top1_agreement"] == 1.0
    sess, got = export.load_exported(path, profile="smoke")
    assert got["sha256"] == card["sha256"] and onnxrt.run(sess, x[:3]).shape == (3, 10)
    with pytest.raises(export.ExportError, match="profile 'smoke', not 'full'"):
        export.load_exported(path, profile="full")
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(export.ExportError, match="sha256") as refused:
        export.load_exported(path)
    assert "tiny_fp32.onnx" in str(refused.value) and str(tmp_path) not in str(refused.value), "no machine path in the message"
    export.card_path(path).unlink()
    with pytest.raises(export.ExportError, match="no model card"):
        export.load_exported(path)


def test_eval_sizes_per_profile():
    assert export.eval_images("student", config.PROFILES["smoke"]) == config.PROFILES["smoke"].test_images
    assert export.eval_images("teacher", config.PROFILES["smoke"]) <= 128
    assert export.eval_images("student", config.PROFILES["full"]) == 10_000
    assert export.eval_images("teacher", config.PROFILES["full"]) == 10_000


def test_stale_export_is_refused(tmp_dirs, exported):
    from deploylab import models

    _, info = exported
    p = config.PROFILES["smoke"]
    folder = config.artefacts_dir(p)
    meta = models.save_checkpoint(tiny_net(), folder, "student", {"arch": "tiny", "profile": "smoke"})
    path = folder / "student_fp32.onnx"
    path.write_bytes(info.path.read_bytes())
    source = {"file": meta["file"], "sha256": meta["sha256"]}
    export.write_card(path, role="student", arch="tiny", profile=p, precision="fp32", exporter="dynamo",
                      parity=None, accuracy=None, test_images=None, source=source)
    export.load_exported(path, profile=p)  # matches the current checkpoint
    torch.manual_seed(1)
    models.save_checkpoint(nn.Linear(2, 2), folder, "student", {"arch": "tiny", "profile": "smoke"})  # "retrained"
    with pytest.raises(export.ExportError, match="has been replaced"):
        export.load_exported(path, profile=p)


def test_nonstandard_ops_lists_contrib_operators_only(tmp_path):
    """A graph with ONNX Runtime's own operators (QOperator's QLinearAdd, the nchwc layouts) is flagged; a standard one is not."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Gelu", ["a"], ["b"], domain="com.microsoft"),
             helper.make_node("Gelu", ["b"], ["y"], domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "contrib.onnx")
    assert export.nonstandard_ops(tmp_path / "contrib.onnx") == {"com.microsoft.Gelu": 2}
    standard = helper.make_model(helper.make_graph(nodes[:1], "g", [x], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])]),
                                 opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(standard, tmp_path / "standard.onnx")
    assert export.nonstandard_ops(tmp_path / "standard.onnx") == {}


def test_compare_rounds_calls_a_difference_within_noise_unless_every_round_agrees():
    """Lesson 04's choice between INT8 files: beyond noise only when all (>= 6) paired rounds agree on the sign."""
    agree = onnx_int8.compare_rounds("qdq", [1.64, 1.70, 1.66, 1.65, 1.69, 1.67, 1.66], "qop", [1.58, 1.60, 1.59, 1.60, 1.61, 1.62, 1.60])
    assert agree.beyond_noise and agree.p_value == pytest.approx(2 / 2**7) and agree.median > 0
    assert agree.verdict().startswith("qop faster beyond noise")
    mixed = onnx_int8.compare_rounds("qdq", [1.64, 1.58, 1.66, 1.55, 1.69, 1.57, 1.66], "qop", [1.58, 1.60, 1.59, 1.60, 1.61, 1.62, 1.60])
    assert not mixed.beyond_noise and mixed.verdict().startswith("within noise")
    too_few = onnx_int8.compare_rounds("a", [2.0] * 5, "b", [1.0] * 5)  # all agree, but 2 / 2**5 > 0.05
    assert not too_few.beyond_noise
    with pytest.raises(ValueError):
        onnx_int8.compare_rounds("a", [1.0, 2.0], "b", [1.0])
