# The verbs a person types. `make serve` and `make test` work from a clean clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= iris
MODEL_NAME ?= iris
VERSION ?= 1.0.0
TRAIN_ARGS ?=
# make package: a model file the user already fitted, and what describes it.
MODEL_FILE ?=
REFERENCE_DATA ?=
TARGET ?=
FEATURES ?=
NAME ?= $(MODEL_NAME)
PACKAGE_ARGS ?=

.PHONY: help install train package bundle serve test test-fast bench lint schema system-deps clean

help:
	@echo "make serve    install, train the default bundle if none exists, serve on :8000"
	@echo "make test     unit, API and process tests (installs what they need)"
	@echo "make train    DATASET=iris|wine|breast_cancer|diabetes MODEL_NAME=... VERSION=x.y.z TRAIN_ARGS=..."
	@echo "make package  MODEL_FILE=model.joblib NAME=... VERSION=x.y.z [REFERENCE_DATA=ref.csv TARGET=col FEATURES=a,b,c]"
	@echo "make bench    req/s, p50/p99 against in-run baselines (wrk)"
	@echo "make e2e      container tier: image, compose stack, nginx, Prometheus"
	@echo "make lint     ruff and mypy"

$(BIN)/.installed: requirements.lock requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.lock
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/python -m training --dataset $(DATASET) --name $(MODEL_NAME) --version $(VERSION) $(TRAIN_ARGS)

# Bundle a model the user already fitted (see README, "Serve your own model").
package: install
	@test -n "$(MODEL_FILE)" || { echo "make package needs MODEL_FILE=path/to/model.joblib" >&2; exit 2; }
	$(BIN)/python -m training package "$(MODEL_FILE)" --name "$(NAME)" --version "$(VERSION)" \
		$(if $(REFERENCE_DATA),--reference-data "$(REFERENCE_DATA)") \
		$(if $(TARGET),--target "$(TARGET)") \
		$(if $(FEATURES),--features "$(FEATURES)") $(PACKAGE_ARGS)

# Train only when no bundle of this model exists yet.
bundle: install
	@compgen -G "artifacts/$(MODEL_NAME)/*/manifest.json" >/dev/null || $(MAKE) --no-print-directory train

serve: bundle
	MODEL_NAME=$(MODEL_NAME) $(BIN)/gunicorn -c gunicorn.conf.py

# Prometheus (and promtool) from Debian's archive, for the metrics tests; libgomp1 for LightGBM.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null \
		&& /sbin/ldconfig -p | grep -q libgomp.so.1 || tests/support/install-system-deps.sh

test: install system-deps bundle
	$(BIN)/python -m pytest tests/unit tests/api tests/process

test-fast: install
	$(BIN)/python -m pytest tests/unit tests/api

# Throughput and latency against baselines measured in the same run (wrk from
# Debian's archive, installed if missing); ~6 minutes. BENCH_ARGS=--help for knobs.
bench: install
	$(BIN)/python -m tests.bench.run $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

schema: install
	$(BIN)/python -m service.manifest > training/manifest.schema.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include docker/targets.mk
