#!/usr/bin/env bash
# One set-up for `make lab`, `make test` and `make course`: Debian packages (when possible),
# the virtual environment with the pinned dependencies, the deploylab package, and the dataset.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TOOLS_VENV=${TOOLS_VENV:-.venv-tools}
# the dataset; Java for TorchServe; the Docker engine and debootstrap for lesson 06 (a local base
# image: no registry is reachable in the course's offline setting); Chromium for the JupyterLab UI test;
# Prometheus and promtool for lesson 09 (no service is started: the lesson starts its own on 127.0.0.1).
DEBIAN_PACKAGES=(dataset-fashion-mnist openjdk-17-jre-headless docker.io docker-compose debootstrap chromium prometheus)

say() { printf '[setup] %s\n' "$*"; }

install_debian_packages() {
  local missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    say "not a Debian-like system: install the equivalent of: ${missing[*]} (see README, 'Set-up elsewhere')"
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "missing Debian packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}"
    say "(continuing: the dataset can also come from data/ or torchvision's download)"
    return 0
  fi
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" || { apt-get update -q && apt-get install -y -q "${missing[@]}"; }
}

install_venv() {
  local stamp="$VENV/.deploylab-installed" want
  want=$(cat requirements/lock.txt requirements/base.txt pyproject.toml | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
  fi
  say "installing pinned dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c requirements/lock.txt -r requirements/base.txt 2> >(grep -v "^WARNING: Location" >&2)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . 2> >(grep -v "^WARNING: Location" >&2)
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name deploylab --display-name "Python (deploylab)" >/dev/null
  echo "$want" > "$stamp"
}

# checkov (lesson 08's manifest scan) pins packaging<24, which the course's lock cannot hold: it gets
# a virtual environment of its own, pinned by requirements/tools-lock.txt.
install_tools_venv() {
  local stamp="$TOOLS_VENV/.deploylab-installed" want
  want=$(cat requirements/tools.txt requirements/tools-lock.txt | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  [ -x "$TOOLS_VENV/bin/python" ] || "$PYTHON" -m venv "$TOOLS_VENV"
  say "installing the manifest scanner (checkov) into $TOOLS_VENV"
  "$TOOLS_VENV/bin/python" -m pip install -q --disable-pip-version-check -c requirements/tools-lock.txt -r requirements/tools.txt 2> >(grep -v "^WARNING: Location" >&2)
  echo "$want" > "$stamp"
}

install_debian_packages
install_venv
install_tools_venv
"$VENV/bin/deploylab" data
say "ready: $VENV"
