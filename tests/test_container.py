"""Unit tests of lesson 06's pure parts: parsing, the docker run arguments, the Dockerfile (hadolint)
and the consistency of docker/ with lesson 05's secure defaults and the lock file. No engine needed."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from deploylab import config
from deploylab.serving import container, docker_build, engine, torchserve

DOCKER = config.ROOT / "docker"


def test_hadolint_reports_nothing_above_info():
    findings = docker_build.hadolint()
    serious = [f for f in findings if f["level"] not in ("info", "style")]
    assert not serious, f"hadolint: {serious}"


def test_hadolint_does_find_problems(tmp_path):
    """The lint check can fail: a Dockerfile with classic mistakes gets warnings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install python3\nADD . /app\nRUN cd /app && pip install .\n")
    levels = {f["level"] for f in docker_build.hadolint(bad)}
    assert {"warning", "error"} & levels


def test_parse_key_file():
    text = json.dumps({"management": {"key": "m1", "expiration time": "x"}, "inference": {"key": "i1"}, "API": {"key": "a"}})
    assert container.parse_key_file(text) == {"inference": "i1", "management": "m1"}
    with pytest.raises(engine.ContainerError, match="key file"):
        container.parse_key_file('{"inference": {}}')
    with pytest.raises(engine.ContainerError):
        container.parse_key_file("not json")


def test_parse_port_takes_the_loopback_binding():
    assert container.parse_port("127.0.0.1:32769\n") == 32769
    assert container.parse_port("[::1]:40000\n127.0.0.1:40001\n") == 40001
    with pytest.raises(engine.ContainerError, match="127.0.0.1"):
        container.parse_port("0.0.0.0:32769\n")  # published on every interface: refused


def test_count_steps():
    log = "Step 1/3 : FROM x\n ---> abc\nStep 2/3 : RUN y\n ---> Using cache\nStep 3/3 : CMD z\n"
    assert docker_build.count_steps(log) == (3, 1)


def test_run_args_are_secure_by_default():
    args = container.Container("img").run_args()
    joined = " ".join(args)
    published = [args[i + 1] for i, a in enumerate(args) if a == "--publish"]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    assert not any(p.endswith(":8081") for p in published), "the management API must not be published"
    assert published == [f"127.0.0.1::{container.INFERENCE_PORT}"], "only inference: metrics answer without a key"
    with_metrics = container.Container("img", publish_metrics=True).run_args()
    assert [with_metrics[i + 1] for i, a in enumerate(with_metrics) if a == "--publish"] == [
        f"127.0.0.1::{container.INFERENCE_PORT}", f"127.0.0.1::{container.METRICS_PORT}"]
    for flag in ("--read-only", "--init", "--memory", "--cap-drop", "no-new-privileges"):
        assert flag in args or flag in joined
    assert "/tmp:" in joined and f"{container.WORKDIR}:" in joined and f"uid={container.USER_ID}" in joined
    assert "--read-only" not in container.Container("img", read_only=False).run_args()


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_container_config_keeps_lesson05_secure_defaults():
    inside = _properties((DOCKER / "config.properties").read_text())
    lesson05 = _properties(torchserve.config_properties({k: 1 for k in ("inference", "management", "metrics", "grpc_inference",
                                                                     "grpc_management", "worker_base")}, config.ROOT))
    for key in ("disable_token_authorization", "enable_model_api", "max_request_size", "install_py_dep_per_model",
                "enable_envvars_config", "metrics_mode", "job_queue_size"):
        assert inside[key] == lesson05[key], key
    assert inside["management_address"].startswith("http://127.0.0.1:")  # loopback inside the container
    assert inside["grpc_inference_address"] == inside["grpc_management_address"] == "127.0.0.1"
    ports = {int(inside[k].rsplit(":", 1)[1]) for k in ("inference_address", "metrics_address")}
    assert ports == {container.INFERENCE_PORT, container.METRICS_PORT}
    assert inside["load_models"].startswith(f"{docker_build.MODEL}=")


def test_dockerfile_exposes_only_what_is_published_and_runs_as_non_root():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == {container.INFERENCE_PORT}  # metrics answer without a key: not exposed
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] == str(container.USER_ID)
    assert "HEALTHCHECK" in text and "openjdk-17-jre-headless" in text


def test_compose_matches_the_image():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = compose["services"]["serve"]
    text = (DOCKER / "Dockerfile").read_text()
    hc = re.search(r"HEALTHCHECK --interval=(\S+) --timeout=(\S+) --start-period=(\S+) --retries=(\d+)", text)
    assert hc, "the Dockerfile's HEALTHCHECK options changed: update this test and compose.yaml"
    assert (svc["healthcheck"]["interval"], svc["healthcheck"]["timeout"], svc["healthcheck"]["start_period"],
            svc["healthcheck"]["retries"]) == (hc[1], hc[2], hc[3], int(hc[4]))
    assert json.dumps(svc["healthcheck"]["test"][1:]) in text.replace('"CMD", ', "").replace("CMD ", "")
    assert "ports" not in svc, "behind the proxy, TorchServe's ports are published nowhere (tests/test_proxy.py)"
    assert svc["read_only"] is True and svc["mem_limit"] and svc["cap_drop"] == ["ALL"]
    tmpfs = " ".join(svc["tmpfs"])
    assert "/tmp:" in tmpfs and f"{container.WORKDIR}:" in tmpfs


def test_image_requirements_are_pinned_in_the_lock_file():
    lock = {line.split("==")[0].lower() for line in (config.ROOT / "requirements/lock.txt").read_text().splitlines() if "==" in line}
    wanted = [line.strip() for line in (DOCKER / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert wanted and "torchvision" not in wanted and "torch" not in wanted
    missing = [w for w in wanted if w.lower() not in lock]
    assert not missing, f"not pinned in requirements/lock.txt: {missing}"


def test_dockerignore_keeps_data_and_venvs_out():
    lines = [ln.strip() for ln in (config.ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the context is a whitelist: everything out, then the few paths the build needs"
    allowed = [ln[1:] for ln in lines if ln.startswith("!")]
    assert not any(a.startswith(("data", ".venv", "results", "notebooks")) for a in allowed)
    assert "deploylab/" in allowed and "docker/" in allowed


def test_sizes_and_targets():
    for name in config.PROFILES:
        s = container.sizes(config.get_profile(name))
        assert s.healthy_timeout_s > container.TARGETS.healthy_s


def test_lock_versions_are_the_lock_files_pins():
    """Lesson 06 compares the image's versions with these: they must be read from the lock, not typed."""
    pins = dict(line.split("==", 1) for line in docker_build.LOCK_FILE.read_text().splitlines() if "==" in line)
    got = docker_build.lock_versions()
    assert set(got) == {"torch", "onnxruntime", "torchserve", "numpy"} and all(got[p] == pins[p] for p in got)
    with pytest.raises(engine.ContainerError, match="no-such-package"):
        docker_build.lock_versions(("torch", "no-such-package"))


def test_build_result_carries_the_command_as_run():
    """Lesson 06 prints the `docker build` argument list that ran (BuildResult.argv), not a string written by hand."""
    import dataclasses
    from pathlib import Path

    fields = {f.name: f.default for f in dataclasses.fields(docker_build.BuildResult)}
    assert fields["argv"] == ()
    r = docker_build.BuildResult("t:x", "sha256:0", 1.0, 2, 1, 10, Path("build/x.log"), ("docker", "build", "-f", "docker/Dockerfile"))
    assert r.to_dict()["argv"][:2] == ("docker", "build")
