import pytest
import torch

from deploylab import models


@pytest.mark.parametrize("arch, params", [("resnet50", 23_500_000), ("mobilenet_v2", 2_230_000), ("mobilenet_v2_x0_5", 700_000)])
def test_architectures_take_one_channel_32px_and_give_10_logits(arch, params):
    model = models.build(arch).eval()
    with torch.inference_mode():
        out = model(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 10)
    assert abs(models.count_parameters(model) - params) / params < 0.02


def test_unknown_architecture():
    with pytest.raises(ValueError, match="resnet50, mobilenet_v2, mobilenet_v2_x0_5"):
        models.build("vgg16")


@pytest.fixture
def saved(tmp_path):
    model = models.build("mobilenet_v2")
    meta = models.save_checkpoint(model, tmp_path, "student", {"arch": "mobilenet_v2", "profile": "smoke"})
    return tmp_path, model, meta


def test_checkpoint_roundtrip(saved):
    folder, model, meta = saved
    loaded, got = models.load_checkpoint(folder, "student", arch="mobilenet_v2", profile="smoke")
    assert got["sha256"] == meta["sha256"] and got["profile"] == "smoke"
    x = torch.randn(1, 1, 32, 32)
    model.eval()
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_tampered_checkpoint_is_refused(saved):
    folder, _, _ = saved
    pt = folder / "student.pt"
    raw = bytearray(pt.read_bytes())
    raw[-100] ^= 0xFF
    pt.write_bytes(bytes(raw))
    with pytest.raises(models.CheckpointError, match="sha256"):
        models.load_checkpoint(folder, "student", arch="mobilenet_v2", profile="smoke")


def test_wrong_profile_or_arch_is_refused(saved):
    folder, _, _ = saved
    with pytest.raises(models.CheckpointError, match="built for profile 'smoke', not 'full'"):
        models.load_checkpoint(folder, "student", arch="mobilenet_v2", profile="full")
    with pytest.raises(models.CheckpointError, match="not a 'resnet50'"):
        models.load_checkpoint(folder, "student", arch="resnet50", profile="smoke")


def test_missing_weights_or_broken_metadata(saved):
    folder, _, _ = saved
    (folder / "student.pt").unlink()
    with pytest.raises(models.CheckpointError, match="weights .* are missing"):
        models.load_checkpoint(folder, "student", arch="mobilenet_v2", profile="smoke")
    (folder / "student.json").write_text("{not json")
    with pytest.raises(models.CheckpointError, match="not valid JSON"):
        models.read_metadata(folder, "student")
