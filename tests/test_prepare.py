"""Resumable training and the shipped models: interrupted runs continue, bad files are refused.

These tests train tiny runs (a few hundred images) so that they finish in seconds; the recipes of
the shipped models are replaced by one-epoch ones for the same reason. The code paths are the real ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging

import pytest
import torch
from torch import nn

from deploylab import assets, cli, config, data, models, train
from deploylab.files import sha256_file


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 10))


RECIPE = train.Recipe(epochs=3, batch_size=64, lr=0.05)


@pytest.fixture
def xy():
    return data.tensors("train", 256)


class Interrupt(KeyboardInterrupt):
    pass


@contextlib.contextmanager
def interrupt_after(epochs: int):
    """Inside the block, fit() stops like Ctrl-C right after it saved the resume checkpoint of epoch ``epochs``.

    Its own MonkeyPatch, so that leaving the block undoes only this (not the fixtures' temporary folders).
    """
    saved: list[int] = []
    real = train.save_resume

    def save_then_stop(path, state):
        real(path, state)
        saved.append(state["epoch"])
        if state["epoch"] == epochs:
            raise Interrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_resume", save_then_stop)
        yield saved


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, xy):
    x, y = xy
    straight = tiny_net()
    train.fit(straight, x, y, RECIPE, device=torch.device("cpu"))

    resume = tmp_path / "resume.pt"
    interrupted = tiny_net()
    with interrupt_after(1) as saved, pytest.raises(Interrupt):
        train.fit(interrupted, x, y, RECIPE, device=torch.device("cpu"), resume=resume)
    assert saved == [1] and resume.is_file()
    again = tiny_net()  # a new process would start from a fresh model
    history = train.fit(again, x, y, RECIPE, device=torch.device("cpu"), resume=resume)
    assert history["resumed_at_epochs"] == [1] and len(history["loss"]) == 3
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name  # model, optimiser, schedule and RNGs all restored


def test_a_corrupt_resume_checkpoint_restarts_from_scratch(tmp_path, xy, caplog):
    x, y = xy
    resume = tmp_path / "resume.pt"
    resume.write_bytes(b"PK\x03\x04 truncated by a killed process")
    with caplog.at_level(logging.WARNING):
        history = train.fit(tiny_net(), x, y, RECIPE, device=torch.device("cpu"), resume=resume)
    assert "corrupt" in caplog.text and "restarts from scratch" in caplog.text
    assert history["resumed_at_epochs"] == [] and len(history["loss"]) == 3


def test_a_resume_checkpoint_of_another_recipe_is_refused(tmp_path, xy):
    x, y = xy
    resume = tmp_path / "resume.pt"
    with interrupt_after(1), pytest.raises(Interrupt):
        train.fit(tiny_net(), x, y, RECIPE, device=torch.device("cpu"), resume=resume)
    before = resume.read_bytes()
    with pytest.raises(train.ResumeError, match=r"differs in: recipe.*--force"):
        train.fit(tiny_net(), x, y, dataclasses.replace(RECIPE, lr=0.1), device=torch.device("cpu"), resume=resume)
    assert resume.read_bytes() == before  # refused, not overwritten


def test_fp16_storage_halves_the_file_and_loads_into_fp32(tmp_path):
    model = models.build("mobilenet_v2").eval()
    m32 = models.save_checkpoint(model, tmp_path / "a", "student", {"arch": "mobilenet_v2", "profile": "shipped"})
    m16 = models.save_checkpoint(model, tmp_path / "b", "student", {"arch": "mobilenet_v2", "profile": "shipped"},
                                 storage=torch.float16)
    assert m16["storage"] == "float16" and m16["size_bytes"] < 0.55 * m32["size_bytes"]
    loaded, _ = models.load_checkpoint(tmp_path / "b", "student", arch="mobilenet_v2", profile="shipped")
    assert next(loaded.parameters()).dtype == torch.float32
    x = data.tensors("test", 8)[0]
    with torch.inference_mode():
        assert (loaded(x) - model(x)).abs().max() < 0.05


@pytest.fixture
def tiny_shipped(tmp_dirs, monkeypatch):
    """The shipped profiles with one-epoch recipes on 320 images, and 256 test images (and the teacher's
    cached training-set logits of `prepare` on those 320 images, not on workshop's 12,000)."""
    monkeypatch.setitem(assets.SHIPPED_RECIPES, "teacher", train.Recipe(epochs=1, batch_size=64, lr=0.05))
    monkeypatch.setitem(assets.SHIPPED_RECIPES, "student", train.Recipe(epochs=2, batch_size=64, lr=0.05))
    monkeypatch.setattr(assets, "training_images", lambda p: 320 if p.models == "shipped" else p.train_images)
    monkeypatch.setitem(config.PROFILES, "workshop",
                        dataclasses.replace(config.PROFILES["workshop"], test_images=256, train_images=320))
    return config.PROFILES["workshop"]


def test_prepare_ships_verified_models_that_lessons_load(tiny_shipped, capsys):
    assert cli.main(["prepare", "--profile", "workshop"]) == 0
    out = capsys.readouterr().out
    assert "training time of these models together" in out and "stored float" in out
    folder = config.SHIPPED_DIR
    manifest = (folder / assets.MANIFEST).read_text().split()
    assert manifest[1::2] == ["student.pt", "teacher.pt"]
    meta = json.loads((folder / "teacher.json").read_text())
    for key in ("recipe", "test_accuracy", "training_seconds", "hardware", "versions", "data_sha256", "sha256", "rebuild"):
        assert key in meta, key
    assert len(meta["val_accuracy_per_epoch"]) == len(meta["epoch_seconds"]) == meta["recipe"]["epochs"] == 1
    assert meta["profile"] == "shipped" and meta["rebuild"] == "deploylab prepare --profile workshop --only teacher --force"
    assert not list(config.RESUME_DIR.rglob("*.pt"))  # resume checkpoints go once the models are saved
    # full and workshop load the same shipped files
    assert assets.teacher("full").meta["sha256"] == assets.teacher("workshop").meta["sha256"] == meta["sha256"]


def test_a_lesson_never_trains_a_missing_shipped_model(tiny_shipped):
    with pytest.raises(models.CheckpointError, match=r"git checkout -- models.*deploylab prepare --profile workshop"):
        assets.teacher("workshop")
    assert not config.SHIPPED_DIR.exists()


@pytest.mark.parametrize("damage", ["truncated", "lfs pointer", "replaced"])
def test_a_damaged_shipped_model_is_refused_with_the_fix(tiny_shipped, damage):
    assets.prepare("workshop", only=("student",), logits_cache=False)
    pt = config.SHIPPED_DIR / "student.pt"
    raw = pt.read_bytes()
    if damage == "truncated":
        pt.write_bytes(raw[: len(raw) // 2])
    elif damage == "lfs pointer":
        pt.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4712345\n")
    else:  # a different, valid model whose metadata was edited to match: the manifest still catches it
        other = models.build(models.ROLES["student"])
        torch.save(other.state_dict(), pt)
        meta = json.loads(pt.with_suffix(".json").read_text())
        meta["sha256"] = sha256_file(pt)
        pt.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(models.CheckpointError, match=r"refusing shipped model .*git checkout.*--only student --force"):
        assets.student("workshop")


def test_an_interrupted_force_run_never_replaces_the_good_model(tiny_shipped):
    assets.prepare("workshop", only=("student",), logits_cache=False)
    pt = config.SHIPPED_DIR / "student.pt"
    good = pt.read_bytes()
    with interrupt_after(1), pytest.raises(Interrupt):
        assets.prepare("workshop", only=("student",), force=True, logits_cache=False)
    assert pt.read_bytes() == good and assets.student("workshop").meta["sha256"] == sha256_file(pt)
    assert assets.resume_path("student", tiny_shipped).is_file()  # the finished epoch is kept for the next run
    metas = assets.prepare("workshop", only=("student",), logits_cache=False)  # the same command again: continues
    assert metas["student"]["resumed_at_epochs"] == [1] and metas["student"]["sha256"] == sha256_file(pt)
    assert not assets.resume_path("student", tiny_shipped).is_file()
    again = assets.prepare("workshop", only=("student",), logits_cache=False)  # nothing left to do: verified, not retrained
    assert again["student"]["created"] == metas["student"]["created"]


def test_a_cpu_without_bf16_trains_in_fp32_without_a_probe(monkeypatch, xy):
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx2", "fma"})
    x, y = xy
    amp, probe = train.choose_autocast(tiny_net(), x[:64], y[:64], nn.functional.cross_entropy, torch.device("cpu"))
    assert amp is None and probe == {}
    assert train.precision_name(amp) == "float32"


def test_on_a_bf16_cpu_the_faster_precision_wins_and_is_recorded(monkeypatch, xy):
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    monkeypatch.setattr(train, "_PROBED", {})
    x, y = xy
    rng = torch.get_rng_state()
    amp, probe = train.choose_autocast(tiny_net(), x[:64], y[:64], nn.functional.cross_entropy, torch.device("cpu"))
    assert torch.equal(rng, torch.get_rng_state()), "the probe must not shift the run's random numbers"
    fp32, bf16 = probe["float32_images_per_s"], probe["bfloat16_images_per_s"]
    assert fp32 > 0 and bf16 > 0
    assert amp == (torch.bfloat16 if bf16 > fp32 else None)
    history = train.fit(tiny_net(), x, y, RECIPE, device=torch.device("cpu"), bar=None)
    assert history["precision"] == train.precision_name(amp) and history["precision_probe"] == probe
