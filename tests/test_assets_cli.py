import pytest

from deploylab import assets, cli, config, models

STUDENT = models.ROLES["student"]


def test_missing_checkpoint_without_build_says_what_to_run(tmp_dirs):
    with pytest.raises(models.CheckpointError, match="deploylab prepare --profile smoke"):
        assets.teacher("smoke", build=False)


def test_a_checkpoint_of_another_profile_is_refused_not_retrained(tmp_dirs):
    folder = config.artefacts_dir("smoke")
    models.save_checkpoint(models.build(STUDENT), folder, "student", {"arch": STUDENT, "profile": "full"})
    before = (folder / "student.pt").read_bytes()
    with pytest.raises(models.CheckpointError, match="built for profile 'full'"):
        assets.student("smoke")
    assert (folder / "student.pt").read_bytes() == before  # nothing overwritten


def test_a_checkpoint_of_an_older_recipe_is_refused_with_the_rebuild_command(tmp_dirs):
    folder = config.artefacts_dir("smoke")
    profile = config.get_profile("smoke")
    recipe = assets.recipe_for("student", profile).to_dict()
    meta = {"arch": STUDENT, "profile": "smoke", "recipe": recipe, "train_images": profile.train_images}
    models.save_checkpoint(models.build(STUDENT), folder, "student", meta)
    assert assets.student("smoke").meta["recipe"] == recipe  # the current recipe loads

    models.save_checkpoint(models.build(STUDENT), folder, "student",
                           {**meta, "recipe": {**recipe, "batch_size": recipe["batch_size"] * 4}})
    before = (folder / "student.pt").read_bytes()
    with pytest.raises(models.CheckpointError, match=r"recipe batch_size.*prepare --profile smoke --only student --force"):
        assets.student("smoke")
    assert (folder / "student.pt").read_bytes() == before


def test_unknown_role():
    with pytest.raises(ValueError, match="teacher, student"):
        assets.load_or_build("oracle", "smoke")


def test_cli_reports_bad_profile_clearly(capsys):
    assert cli.main(["prepare", "--profile", "huge"]) == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err


def test_cli_data_verifies_offline(capsys):
    assert cli.main(["data", "--offline"]) == 0
    assert "Fashion-MNIST verified" in capsys.readouterr().out
