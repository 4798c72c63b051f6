import pytest

from deploylab import config


def test_env_variable_chooses_profile(monkeypatch):
    monkeypatch.setenv("DEPLOYLAB_PROFILE", "full")
    assert config.get_profile().name == "full"
    monkeypatch.setenv("DEPLOYLAB_PROFILE", " Smoke ")
    assert config.get_profile().name == "smoke"


def test_default_profile_is_workshop(monkeypatch):
    monkeypatch.delenv("DEPLOYLAB_PROFILE", raising=False)
    assert config.get_profile().name == "workshop"


def test_unknown_profile_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("DEPLOYLAB_PROFILE", "fulll")
    with pytest.raises(config.ProfileError, match="smoke, workshop, full"):
        config.get_profile()


def test_profiles_grow_from_smoke_to_full():
    smoke, workshop, full = (config.PROFILES[n] for n in ("smoke", "workshop", "full"))
    assert smoke.train_images < workshop.train_images and full.train_images is None
    assert workshop.test_images is None and full.test_images is None  # the whole test set
    assert smoke.bench_rounds < workshop.bench_rounds <= full.bench_rounds


def test_banner_is_the_first_line_notebooks_print():
    first, second = config.banner(config.PROFILES["smoke"]).splitlines()
    assert first == "deploylab profile: smoke"
    assert second.startswith("machine: ") and " cores, " in second


def test_set_threads_is_explicit():
    assert config.set_threads(1) == 1
    assert config.set_threads(2) == 2


def test_every_lesson_module_sizes_every_profile_the_same_way():
    """One way to size a lesson: ``SIZES[profile.name]`` behind ``sizes(profile)``, for every profile."""
    import inspect

    from deploylab import distill, export, prune, quantize
    from deploylab.backends import harness
    from deploylab.ops import drift, monitoring
    from deploylab.serving import asgi, container, ray_serve, scenarios, torchserve

    for module in (quantize, prune, distill, export, harness, torchserve, container, asgi, ray_serve, scenarios, drift, monitoring):
        assert set(module.SIZES) == set(config.PROFILES), module.__name__
        assert list(inspect.signature(module.sizes).parameters) == ["profile"], module.__name__
        for profile in config.PROFILES.values():
            assert module.sizes(profile) is module.SIZES[profile.name]
