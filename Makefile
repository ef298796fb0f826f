# The verbs a person types. `make serve` and `make test` work from a clean clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= iris
MODEL_NAME ?= iris
VERSION ?= 1.0.0
TRAIN_ARGS ?=
API_KEYS_FILE ?= secrets/api-keys
# make package: a model file the user already fitted, and what describes it.
MODEL_FILE ?=
REFERENCE_DATA ?=
TARGET ?=
FEATURES ?=
NAME ?= $(MODEL_NAME)
PACKAGE_ARGS ?=
# make rules: where the drift rules go (Prometheus in compose and Swarm loads rules/*.yml).
RULES_FILE ?= docker/prometheus/rules/drift.yml
RULES_ARGS ?=

.PHONY: help install train package bundle rules serve test test-fast test-deploy bench lint schema system-deps checkov clean \
	api-key api-key-revoke

help:
	@echo "make serve    install, train the default bundle if none exists, serve on 127.0.0.1:8000"
	@echo "make test     unit, deploy, API and process tests (installs what they need)"
	@echo "make test-deploy  Kubernetes manifests: kustomize render, schema validation, checkov"
	@echo "make train    DATASET=iris|wine|breast_cancer|diabetes MODEL_NAME=... VERSION=x.y.z TRAIN_ARGS=..."
	@echo "make package  MODEL_FILE=model.joblib NAME=... VERSION=x.y.z [REFERENCE_DATA=ref.csv TARGET=col FEATURES=a,b,c]"
	@echo "make rules    MODEL_NAME=... RULES_FILE=path: Prometheus drift rules (PSI per feature, alerts) from the bundle's manifest"
	@echo "make bench    req/s, p50/p99 against in-run baselines (wrk)"
	@echo "make e2e      container tier: image, compose stack, nginx, Prometheus"
	@echo "make lint     ruff and mypy"
	@echo "make api-key NAME=<id>         mint an API key; it is printed once, as the last line"
	@echo "make api-key-revoke NAME=<id>  revoke it (live within 5 s, no restart)"

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

# Drift scores and alerts for the newest bundle of MODEL_NAME (or VERSION when
# given on the command line), from its manifest: docs/monitoring.md.
rules: bundle
	$(BIN)/python -m service.monitoring.rules --model-dir "$(or $(MODEL_DIR),artifacts)" \
		--model-name "$(MODEL_NAME)" $(if $(filter command line,$(origin VERSION)),--model-version "$(VERSION)") \
		--output "$(RULES_FILE)" $(RULES_ARGS)

# Loopback unless BIND or PORT say otherwise: a laptop does not serve its
# network by accident. The image binds all interfaces inside its container.
serve: bundle
	MODEL_NAME=$(MODEL_NAME) BIND="$(or $(BIND),127.0.0.1:$(or $(PORT),8000))" $(BIN)/gunicorn -c gunicorn.conf.py

# Keys live in API_KEYS_FILE (digests only); running servers pick changes up
# within seconds. Standard-library Python: no virtualenv needed.
api-key:
	@test -n "$(NAME)" || { echo "usage: make api-key NAME=<key id>" >&2; exit 2; }
	@$(PYTHON) -m service.auth.keys --file "$(API_KEYS_FILE)" add "$(NAME)"

api-key-revoke:
	@test -n "$(NAME)" || { echo "usage: make api-key-revoke NAME=<key id> [ARGS=--allow-open]" >&2; exit 2; }
	@$(PYTHON) -m service.auth.keys --file "$(API_KEYS_FILE)" revoke "$(NAME)" $(ARGS)

# Prometheus (and promtool), nginx and its njs module (the proxy tests) and
# libgomp1 (LightGBM) from Debian's archive.
NJS_MODULE := /usr/lib/nginx/modules/ngx_http_js_module.so
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v nginx >/dev/null \
		&& test -e $(NJS_MODULE) && /sbin/ldconfig -p | grep -q libgomp.so.1 \
		|| tests/support/install-system-deps.sh

# checkov (for tests/deploy) in a virtualenv of its own: its pins clash with
# the project's (packaging 23.2, boto3, networkx 2...). Its lock comes from
#   echo checkov==3.3.30 | uv pip compile - --universal --python-version 3.11 \
#     --no-header --annotation-style line -o tests/deploy/checkov.lock
TOOLS ?= .tools
CHECKOV_VENV := $(TOOLS)/checkov

$(CHECKOV_VENV)/.installed: tests/deploy/checkov.lock
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/deploy/checkov.lock
	touch $@

checkov: $(CHECKOV_VENV)/.installed

# deploy/kubernetes validated offline: kustomize render, Kubernetes schemas, checkov.
test-deploy: install checkov
	CHECKOV=$(CHECKOV_VENV)/bin/checkov $(BIN)/python -m pytest tests/deploy

test: install system-deps bundle checkov
	CHECKOV=$(CHECKOV_VENV)/bin/checkov $(BIN)/python -m pytest tests/unit tests/deploy tests/api tests/process

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
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include docker/targets.mk
