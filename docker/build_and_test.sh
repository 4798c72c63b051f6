#!/usr/bin/env bash
# Build the serving image, run it, check it against in-process ONNX Runtime, remove it.
# A thin wrapper around `python -m deploylab.serving.container` (the notebook and the tests call the same code).
#
#   docker/build_and_test.sh [--profile smoke|workshop|full] [--wheels DIR] [--certs FILE|DIR] [--build-arg K=V] [--keep]
#   docker/build_and_test.sh engine       # check (as root: start) the Docker engine
#   docker/build_and_test.sh base-image   # the debootstrap stand-in for debian:bookworm-slim (deploylab-debian:bookworm-slim), if missing
#   docker/build_and_test.sh build        # build only
#   docker/build_and_test.sh clean        # remove containers left by an interrupted run
#   docker/build_and_test.sh lint         # hadolint docker/Dockerfile
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m deploylab.serving.container "$@"
