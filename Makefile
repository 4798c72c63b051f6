# deploylab: `make lab` to learn, `make test` to check everything, `make course` to execute the lessons.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= workshop
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb notebooks/[0-9][0-9][a-z]_*.ipynb))
PYTEST_NB := --nbval-lax --nbval-current-env --nbval-cell-timeout=600

.PHONY: setup lab test test-unit test-notebooks course prepare report bundle docker lock clean

setup:
	@bash scripts/setup.sh

# Bound to 127.0.0.1 with Jupyter's token; as root (containers, lab VMs) Jupyter needs --allow-root.
lab: setup
	$(BIN)/jupyter lab --ip=127.0.0.1 --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

# Everything: the linter, unit tests, then every notebook under nbval, in the smoke profile.
test: setup
	$(BIN)/ruff check deploylab handlers tests
	DEPLOYLAB_PROFILE=smoke $(BIN)/python -m pytest -p no:cacheprovider -ra --durations=30 tests $(NOTEBOOKS) $(PYTEST_NB)

test-unit: setup
	DEPLOYLAB_PROFILE=smoke $(BIN)/python -m pytest -p no:cacheprovider -ra tests

test-notebooks: setup
	DEPLOYLAB_PROFILE=smoke $(BIN)/python -m pytest -p no:cacheprovider -ra --durations=15 $(NOTEBOOKS) $(PYTEST_NB)

# Execute every notebook in PROFILE (or those named: make course NOTEBOOKS=notebooks/03_distillation.ipynb);
# on success its run time goes to results/run_times.json and into the intro's Time paragraph, the
# executed notebook replaces the one in notebooks/ (the outputs committed for readers) and an HTML
# copy goes to build/.
course: setup
	@mkdir -p build/executed build/html
	@set -e; for nb in $(NOTEBOOKS); do \
	  echo "== $$nb ($(PROFILE))"; \
	  start=$$(date +%s); \
	  DEPLOYLAB_PROFILE=$(PROFILE) $(BIN)/jupyter nbconvert --to notebook --execute \
	    --ExecutePreprocessor.timeout=3600 --output-dir build/executed "$$nb"; \
	  $(BIN)/python -m deploylab.runtimes "build/executed/$$(basename $$nb)" $(PROFILE) $$(( $$(date +%s) - start )); \
	  cp "build/executed/$$(basename $$nb)" "$$nb"; \
	  $(BIN)/jupyter nbconvert --to html --output-dir build/html "$$nb" >/dev/null 2>&1; \
	done
	$(BIN)/python -m deploylab.runtimes --readme

prepare: setup
	$(BIN)/deploylab prepare --profile $(PROFILE)

# An offline bundle for a workshop (several GB: the CUDA build of torch); tests/test_bundle.py checks the lock file against it.
bundle: setup
	$(BIN)/deploylab bundle build/bundle --profile $(PROFILE)

# Build the serving image of PROFILE, run it, check it against in-process ONNX Runtime, remove it (lesson 06).
docker: setup
	bash docker/build_and_test.sh --profile $(PROFILE)

report: setup
	$(BIN)/deploylab report --profile full

# Regenerate requirements/lock.txt from the current environment (after changing base.txt).
lock:
	$(BIN)/python -m pip freeze --exclude-editable --exclude deploylab | LC_ALL=C sort > requirements/lock.txt

clean:
	rm -rf build .pytest_cache
