# dcml: two commands for a newcomer -- `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dcml-installed
REGISTRY ?= dcml
TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
PYTEST_ARGS ?=
# Test processes (pytest-xdist); each test module stays in one process (its module fixtures run once).
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=15
MLFLOW_DB ?= $(CURDIR)/mlflow/mlflow.db

.PHONY: install test test-all browser demo fashion-mnist mlflow-ui images push docker-e2e bench gpu-check compile clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# Tests use real Fashion-MNIST when it can be had (they skip what needs it otherwise).
# `make test`: everything but the extra end-to-end runs marked `full` (budget: 10 minutes on an idle 2-core machine);
# `make test-all`: all of them (what .ci/run runs).
test: install browser
	-@$(BIN)/python -m data_prep.fashion_mnist_fetch
	$(PYTEST) -m "not full" $(PYTEST_ARGS)

test-all: install browser
	-@$(BIN)/python -m data_prep.fashion_mnist_fetch
	$(PYTEST) $(PYTEST_ARGS)

# Headless Chromium for the MLflow UI test (it skips without /usr/bin/chromium); installs only as root.
browser:
	-@[ -x /usr/bin/chromium ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
	  apt-get install -y -qq chromium >/dev/null 2>&1; } || echo "browser: chromium not installed; the MLflow UI test will skip"

# Fashion-MNIST from Debian's package (see ../shared/data/README.md).
fashion-mnist:
	@$(BIN)/python -m data_prep.fashion_mnist_fetch

demo: install fashion-mnist
	$(BIN)/dcml run --config demo

mlflow-ui: install
	@echo "dcml runs: http://127.0.0.1:5000/#/experiments (switch the top-left toggle to 'Model training' once)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(MLFLOW_DB) --host 127.0.0.1 --port 5000

compile: install
	$(BIN)/dcml compile --out pipeline.yaml --image-tag $(TAG)

images:
	bash docker/build.sh $(REGISTRY) $(TAG)

push:
	bash docker/push.sh $(REGISTRY) $(TAG)

docker-e2e:
	bash docker/e2e.sh

bench: install
	$(BIN)/python -m bench.run_all

# The GPU path in one call (needs CUDA; refuses with exit 2 without it; under 10 minutes): the tests marked
# `gpu` and a short cars196 fast-mode run printing images/s. Not part of `make test`. See docs/SCALE.md.
# No install step: GPU machines are often offline; it runs in the .venv as it is.
gpu-check:
	@[ -x $(BIN)/python ] || { echo "gpu-check: no $(BIN)/python here; run make install first" >&2; exit 2; }
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
