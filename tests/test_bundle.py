"""The offline bundle: built with the real CLI, installed by its own script with no index, tampering refused.

The full bundle holds the CUDA build of torch (several GB), too much for a unit test. This test
builds a *partial* bundle instead -- same code path, a smaller requirements file (`--requirements`):
a few small wheels with dependencies of their own (httpx pulls anyio, certifi, httpcore, h11,
idna), the real dataset and the smoke profile's student artefacts (`--exclude` leaves out the
teacher and the exported models) -- then runs the bundle's `install.sh` in a fresh folder with pip
cut off from every index and configuration file.

`deploylab data` needs torch, which the partial bundle does not carry: after the offline install,
the test appends this environment's site-packages *behind* the new venv's own (a .pth file, added
only after pip is done, so pip never saw it) and checks that the bundle's packages and the bundle's
deploylab source win, and that `deploylab data` verifies the dataset the bundle placed.

Whether every pin of requirements/lock.txt resolves from a full bundle's wheels is checked only when
a full bundle exists (`deploylab bundle build/bundle`, or `DEPLOYLAB_BUNDLE=DIR`): building one here
would download gigabytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from deploylab import artefacts, bundle, cli, config, data
from deploylab.files import sha256_file

SUBSET = "tqdm==4.70.1\nhttpx==0.28.1\nPyYAML==6.0.4\n"
EXCLUDE = ["teacher*", "*.onnx", "*.onnx.data", "*.pt2", "torchserve_model_store/*", "cache/teacher.*"]
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
NOWHERE = "http://127.0.0.1:9/simple"  # the discard port: any attempt to use an index fails at once


def _offline_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "DEPLOYLAB_", "VIRTUAL_ENV"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=NOWHERE, PIP_EXTRA_INDEX_URL=NOWHERE, PYTHON=BASE_PYTHON,
               HOME=str(tmp / "home"), https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not (config.artefacts_dir("smoke") / "student.json").is_file():
        pytest.skip("no smoke artefacts: run `deploylab prepare --profile smoke`")
    tmp = tmp_path_factory.mktemp("bundle")
    req = tmp / "requirements-subset.txt"
    req.write_text(SUBSET)
    out = tmp / "bundle"
    argv = ["bundle", str(out), "--profile", "smoke", "--requirements", str(req)] + [a for e in EXCLUDE for a in ("--exclude", e)]
    assert cli.main(argv) == 0
    return out


def test_bundle_holds_wheels_data_artefacts_source_and_a_manifest(built):
    wheels = sorted(p.name.split("-")[0].lower() for p in (built / "wheels").iterdir())
    for name in ("tqdm", "httpx", "httpcore", "anyio", "pyyaml", "setuptools"):
        assert name in wheels, f"{name} missing from the bundle's wheels: {wheels}"
    assert all(p.suffix == ".whl" for p in (built / "wheels").iterdir())
    assert sorted(p.name for p in (built / "data" / "fashion-mnist").iterdir()) == sorted(f"{s}.gz" for s, _ in data.FILES.values())
    arts = built / "data" / "artefacts" / "smoke"
    meta = json.loads((arts / "student.json").read_text())
    assert sha256_file(arts / "student.pt") == meta["sha256"]
    assert not list(arts.glob("teacher*")) and not list(arts.rglob("*.onnx")), "excluded artefacts were bundled"
    assert not [p for p in arts.rglob("*") if p.name.startswith(".")], "temporary files were bundled"
    with tarfile.open(built / "source" / "deploylab-src.tar") as t:
        names = t.getnames()
    assert "deploylab/deploylab/data.py" in names and "deploylab/pyproject.toml" in names
    listed = [ln.split("  ", 1)[1] for ln in (built / bundle.MANIFEST).read_text().splitlines()]
    on_disk = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file() and p.name != bundle.MANIFEST)
    assert sorted(listed) == on_disk
    info = bundle.verify(built)
    assert info["profile"] == "smoke" and info["files"] == len(on_disk) and info["data_sha256"] == data.DATA_SHA256


def test_install_script_installs_offline_and_deploylab_data_verifies(built, tmp_path):
    target = tmp_path / "course"
    env = _offline_env(tmp_path)
    done = subprocess.run(["sh", str(built / "install.sh"), str(target)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "verifying" in done.stdout and "partial bundle" in done.stdout
    py = target / ".venv" / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the bundle's packages were installed into the new venv, from the bundle's wheels only
    where = subprocess.run([str(py), "-c", "import tqdm, httpx, yaml; print(tqdm.__file__); print(httpx.__file__); print(yaml.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split()), where.stdout
    # torch (not in the partial bundle) from this environment, appended behind the new venv's packages
    (site / "zz_host_torch_layer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = subprocess.run([str(py), "-c", "import deploylab, tqdm; print(deploylab.__file__); print(tqdm.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    deploylab_file, tqdm_file = check.stdout.split()
    assert Path(deploylab_file).is_relative_to(target), f"deploylab imported from {deploylab_file}, not the bundle's source"
    assert Path(tqdm_file).is_relative_to(site), "the bundle's tqdm must win over the host's"
    verified = subprocess.run([str(target / ".venv" / "bin" / "deploylab"), "data", "--offline"], cwd=target, env=env,
                              capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stderr[-2000:]
    assert "Fashion-MNIST verified" in verified.stdout and str(target / "data" / "fashion-mnist") in verified.stdout
    placed = target / "data" / "artefacts" / "smoke"
    assert sha256_file(placed / "student.pt") == json.loads((placed / "student.json").read_text())["sha256"]
    assert not artefacts.problems(placed / "student.pt", json.loads((placed / "student.json").read_text()), profile="smoke")


@pytest.fixture
def copy_of(built, tmp_path):
    dst = tmp_path / "bundle-copy"
    shutil.copytree(built, dst)
    return dst


def test_a_tampered_file_is_refused_by_verify_and_by_the_install_script(copy_of, tmp_path, capsys):
    victim = copy_of / "data" / "artefacts" / "smoke" / "student.pt"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    victim.write_bytes(bytes(raw))
    assert cli.main(["bundle", "--verify", str(copy_of)]) == 2
    err = capsys.readouterr().err
    assert "altered" in err and "data/artefacts/smoke/student.pt" in err and "Do not install it" in err
    target = tmp_path / "course"
    done = subprocess.run(["sh", str(copy_of / "install.sh"), str(target)], env=_offline_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "sha256 mismatch: data/artefacts/smoke/student.pt" in done.stderr and "do not install it" in done.stderr
    assert not (target / ".venv").exists(), "the install script went on after a failed check"


def test_missing_and_unlisted_files_are_refused(copy_of):
    wheel = next((copy_of / "wheels").glob("tqdm-*.whl"))
    wheel.unlink()
    (copy_of / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"not from the bundle")
    with pytest.raises(bundle.BundleError) as e:
        bundle.verify(copy_of)
    assert f"missing: wheels/{wheel.name}" in str(e.value) and "not in the manifest: wheels/evil-1.0" in str(e.value)
    (copy_of / bundle.MANIFEST).unlink()
    with pytest.raises(bundle.BundleError, match="interrupted"):
        bundle.verify(copy_of)


def test_bundle_refuses_a_non_empty_folder_and_missing_artefacts(tmp_path, tmp_dirs):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(bundle.BundleError, match="not empty"):
        bundle.build(tmp_path / "full", "smoke")
    with pytest.raises(bundle.BundleError, match="deploylab prepare --profile smoke"):
        bundle.artefact_files(config.get_profile("smoke"))


def _full_bundle() -> Path | None:
    for candidate in (os.environ.get("DEPLOYLAB_BUNDLE"), config.ROOT / "build" / "bundle"):
        if candidate and (Path(candidate) / bundle.MANIFEST).is_file():
            return Path(candidate)
    return None


@pytest.mark.skipif(_full_bundle() is None, reason="no full bundle to check: build one with `deploylab bundle build/bundle` "
                    "(or set DEPLOYLAB_BUNDLE=DIR) to check that every pin of requirements/lock.txt resolves from it offline")
def test_every_pin_of_the_lock_file_resolves_from_a_full_bundle():
    root = _full_bundle()
    assert (root / "requirements.txt").read_text() == bundle.LOCK.read_text(), f"{root} was not built from requirements/lock.txt"
    summary = bundle.check_resolvable(bundle.LOCK, root / "wheels")
    pins = [ln for ln in bundle.LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert summary.startswith("Would install") and len(summary.split()) - 2 >= len(pins), summary
