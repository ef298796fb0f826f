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
# Digests of native models that may be loaded (outside MODEL_DIR): make package
# records the bundle it writes, make serve reads them (exported to its server).
TRUSTED_DIGESTS_FILE ?= secrets/trusted-model-sha256
export TRUSTED_DIGESTS_FILE
# make rules: where the drift rules go (compose's Prometheus loads rules/*.yml; the Swarm stack takes them from the served image).
RULES_FILE ?= docker/prometheus/rules/drift.yml
RULES_ARGS ?=

.PHONY: help install train package bundle rules serve shadow shadow-off promote test test-fast test-deploy bench lint schema docs \
	system-deps checkov oip-spec uv locks clean api-key api-key-revoke client generator kserve-sdk \
	monitoring-tools drift-report test-deps

help:
	@echo "make serve    install, train the default bundle if none exists, serve on 127.0.0.1:8000"
	@echo "make shadow VERSION=x.y.z  score a candidate beside the model make serve serves (make shadow-off, make promote)"
	@echo "make test     unit, deploy, API and process tests (installs what they need)"
	@echo "make test-deploy  Kubernetes manifests: kustomize render, schema validation, checkov"
	@echo "make train    DATASET=iris|wine|breast_cancer|diabetes MODEL_NAME=... VERSION=x.y.z TRAIN_ARGS=..."
	@echo "make package  MODEL_FILE=model.joblib|.pkl|.skops NAME=... VERSION=x.y.z [REFERENCE_DATA=ref.csv TARGET=col FEATURES=a,b,c PACKAGE_ARGS=...]"
	@echo "make rules    MODEL_NAME=... RULES_FILE=path: Prometheus drift rules (PSI per feature, alerts) from the bundle's manifest"
	@echo "make drift-report REFERENCE_DATA=ref.csv PAYLOADS=dir: HTML drift report of captured payloads (Evidently)"
	@echo "make bench    req/s, p50/p99 against in-run baselines (wrk); BENCH_ARGS=--baseline-commit REV"
	@echo "make e2e      container tier: image, compose stack, nginx, Prometheus"
	@echo "make lint     ruff and mypy"
	@echo "make docs     regenerate docs/configuration.md from service/settings.py"
	@echo "make client   a typed Python client (clients/python/) from a served document [OPENAPI_URL=...]"
	@echo "make locks    recompile the lock files from pyproject.toml's extras (pins kept)"
	@echo "make api-key NAME=<id>         mint an API key; it is printed once, as the last line"
	@echo "make api-key-revoke NAME=<id>  revoke it (live within 5 s, no restart; Swarm: make stack-keys)"

TOOLS ?= .tools
PIP_INSTALL := pip install --quiet --disable-pip-version-check

# uv, a pinned release in a virtualenv of its own, installs every virtualenv
# from its lock (a quarter of pip's time: the main one in 15 s, not 60) and
# compiles the lock files. Bytecode is compiled at install, not left to first
# import: where PYTHONDONTWRITEBYTECODE is set (as on this project's
# machines), every process would compile every module it imports from
# source, every time (skipping it made make test minutes slower).
UV_VERSION := 0.13.8
UV := $(TOOLS)/uv/bin/uv
# VENV_INSTALL <venv> <lock>: the tools' virtualenvs get no pip of their own
# (uv installs into them), the project's does.
VENV_INSTALL = $(PYTHON) -m venv $(if $(filter $(TOOLS)/%,$(1)),--without-pip) $(1) \
	&& $(UV) pip install --quiet --compile-bytecode --python $(1)/bin/python -r $(2)

$(UV):
	$(PYTHON) -m venv $(TOOLS)/uv
	$(TOOLS)/uv/bin/$(PIP_INSTALL) uv==$(UV_VERSION)

uv: $(UV)

$(BIN)/.installed: requirements.lock requirements-dev.lock | $(UV)
	$(call VENV_INSTALL,$(VENV),requirements-dev.lock)
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/python -m training --dataset $(DATASET) --name $(MODEL_NAME) --version $(VERSION) \
		--output-dir "$(or $(MODEL_DIR),artifacts)" $(TRAIN_ARGS)

# Bundle a model the user already fitted (see docs/own-model.md).
package: install
	@test -n "$(MODEL_FILE)" || { echo "make package needs MODEL_FILE=path/to/model.joblib" >&2; exit 2; }
	$(BIN)/python -m training package "$(MODEL_FILE)" --name "$(NAME)" --version "$(VERSION)" \
		--output-dir "$(or $(MODEL_DIR),artifacts)" --trusted-digests-file "$(TRUSTED_DIGESTS_FILE)" \
		$(if $(REFERENCE_DATA),--reference-data "$(REFERENCE_DATA)") \
		$(if $(TARGET),--target "$(TARGET)") \
		$(if $(FEATURES),--features "$(FEATURES)") $(PACKAGE_ARGS)

# Train only when no bundle of this model exists yet.
bundle: install
	@compgen -G "$(or $(MODEL_DIR),artifacts)/$(MODEL_NAME)/*/manifest.json" >/dev/null || $(MAKE) --no-print-directory train

# Drift scores and alerts for the newest bundle of MODEL_NAME (or VERSION when
# given on the command line), from its manifest: docs/monitoring.md.
rules: bundle
	$(BIN)/python -m service.monitoring.rules --model-dir "$(or $(MODEL_DIR),artifacts)" \
		--model-name "$(MODEL_NAME)" $(if $(filter command line,$(origin VERSION)),--model-version "$(VERSION)") \
		--output "$(RULES_FILE)" $(RULES_ARGS)

# Loopback unless BIND or PORT say otherwise: a laptop does not serve its
# network by accident. The image binds all interfaces inside its container.
# The master's pid and the rollout requests of make shadow / shadow-off /
# promote live in SERVE_RUN, one per port: give those verbs the same PORT.
SERVE_RUN ?= .run/serve-$(or $(PORT),8000)
ROLLOUT_REQUEST := $(SERVE_RUN)/rollout-request.json
serve: bundle
	@mkdir -p "$(SERVE_RUN)" && rm -f "$(ROLLOUT_REQUEST)" "$(ROLLOUT_REQUEST).outcome"
	MODEL_NAME=$(MODEL_NAME) BIND="$(or $(BIND),127.0.0.1:$(or $(PORT),8000))" \
		ROLLOUT_REQUEST_FILE="$(ROLLOUT_REQUEST)" $(BIN)/gunicorn -c gunicorn.conf.py --pid "$(SERVE_RUN)/master.pid"

# A candidate version scored in every worker beside the one serving, after each
# answer (docs/operations.md#trying-a-new-model); promote: it serves, through a rollout.
ROLLOUT_SEND = $(BIN)/python -m service.server.rollout_request \
	--request-file "$(ROLLOUT_REQUEST)" --pid-file "$(SERVE_RUN)/master.pid"
shadow: install
	@test -n "$(filter command line environment,$(origin VERSION))" \
		|| { echo "usage: make shadow VERSION=x.y.z" >&2; exit 2; }
	@$(ROLLOUT_SEND) shadow "$(VERSION)"

shadow-off: install
	@$(ROLLOUT_SEND) shadow-off

promote: install
	@$(ROLLOUT_SEND) promote

# Keys live in API_KEYS_FILE (digests only); running servers pick changes up
# within seconds. Standard-library Python: no virtualenv needed.
api-key:
	@test -n "$(NAME)" || { echo "usage: make api-key NAME=<key id>" >&2; exit 2; }
	@$(PYTHON) -m service.auth.keys --file "$(API_KEYS_FILE)" add "$(NAME)"

api-key-revoke:
	@test -n "$(NAME)" || { echo "usage: make api-key-revoke NAME=<key id> [ARGS=--allow-empty]" >&2; exit 2; }
	@$(PYTHON) -m service.auth.keys --file "$(API_KEYS_FILE)" revoke "$(NAME)" $(ARGS)

# Prometheus (and promtool), nginx and its njs module (the proxy tests),
# libgomp1 (LightGBM) and Chromium (the drift report's rendering test) from
# Debian's archive.
NJS_MODULE := /usr/lib/nginx/modules/ngx_http_js_module.so
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v nginx >/dev/null \
		&& command -v prometheus-alertmanager >/dev/null \
		&& command -v chromium >/dev/null \
		&& test -e $(NJS_MODULE) && /sbin/ldconfig -p | grep -q libgomp.so.1 \
		|| tests/support/install-system-deps.sh

# checkov (for tests/deploy) in a virtualenv of its own: its pins clash with
# the project's (packaging 23.2, boto3, networkx 2...). Its lock comes from
#   echo checkov==3.3.30 | $(UV) pip compile - --universal --python-version 3.11 \
#     --no-header --annotation-style line -o tests/deploy/checkov.lock
CHECKOV_VENV := $(TOOLS)/checkov

$(CHECKOV_VENV)/.installed: tests/deploy/checkov.lock | $(UV)
	$(call VENV_INSTALL,$(CHECKOV_VENV),tests/deploy/checkov.lock)
	touch $@

checkov: $(CHECKOV_VENV)/.installed

# openapi-python-client (make client) in a virtualenv of its own, as checkov;
# its lock comes from the same command with openapi-python-client==0.29.1
# and -o clients/openapi-python-client.lock.
GENERATOR_VENV := $(TOOLS)/openapi-python-client

$(GENERATOR_VENV)/.installed: clients/openapi-python-client.lock | $(UV)
	$(call VENV_INSTALL,$(GENERATOR_VENV),clients/openapi-python-client.lock)
	touch $@

generator: $(GENERATOR_VENV)/.installed

# A typed Python client generated from the document a server serves (`make
# serve` in another shell, or OPENAPI_URL=...), into clients/python/: not
# committed, it is regenerated against the server it calls. The generator's
# pinned ruff (its post hooks) comes first on PATH.
OPENAPI_URL ?= http://127.0.0.1:8000/openapi.json
CLIENT_DIR ?= clients/python

client: generator
	PATH="$(abspath $(GENERATOR_VENV))/bin:$$PATH" openapi-python-client generate \
		--url "$(OPENAPI_URL)" --meta uv --output-path "$(CLIENT_DIR)" --overwrite \
		--config clients/openapi-python-client.yaml

# KServe's Python SDK (the V2 process tests drive its InferenceRESTClient in a
# subprocess): its pins clash with the project's (pandas<3, python-dateutil<3).
# Its lock: the same command with kserve==0.21.0 and -o tests/process/kserve.lock.
KSERVE_VENV := $(TOOLS)/kserve

$(KSERVE_VENV)/.installed: tests/process/kserve.lock | $(UV)
	$(call VENV_INSTALL,$(KSERVE_VENV),tests/process/kserve.lock)
	touch $@

kserve-sdk: $(KSERVE_VENV)/.installed

# Evidently (make drift-report) in a virtualenv of its own, as checkov: the
# `monitoring` extra, locked on its own (requirements-monitoring.lock), since
# it needs pandas 2 where the service pins 3.
MONITORING_VENV := $(TOOLS)/monitoring

$(MONITORING_VENV)/.installed: requirements-monitoring.lock | $(UV)
	$(call VENV_INSTALL,$(MONITORING_VENV),requirements-monitoring.lock)
	touch $@

monitoring-tools: $(MONITORING_VENV)/.installed

# Captured payloads (PAYLOAD_LOG_DIR's files) against the reference CSV the
# model was packaged with: an HTML report, one line per feature on stdout.
PAYLOADS ?=
REPORT ?= drift-report.html

drift-report: monitoring-tools
	@test -n "$(REFERENCE_DATA)" -a -n "$(PAYLOADS)" || { echo "usage: make drift-report REFERENCE_DATA=ref.csv PAYLOADS=dir [REPORT=drift-report.html]" >&2; exit 2; }
	@$(MONITORING_VENV)/bin/python -m service.monitoring.drift_report \
		--reference "$(REFERENCE_DATA)" --payloads "$(PAYLOADS)" --output "$(REPORT)"

# deploy/kubernetes validated offline: kustomize render, Kubernetes schemas, checkov.
test-deploy: install checkov
	CHECKOV=$(CHECKOV_VENV)/bin/checkov $(BIN)/python -m pytest tests/deploy

# The Open Inference Protocol's REST document, for the V2 conformance tests
# (tests/process): the one MLServer ships in its wheel. The wheel is downloaded
# by pip, checked against the digest in tests/support/mlserver.lock, never
# installed; only the document is taken out of it.
OIP_DIR := $(TOOLS)/open-inference-protocol
OIP_SPEC := $(OIP_DIR)/dataplane.json
OIP_SPEC_IN_WHEEL := mlserver/rest/openapi/dataplane.json

$(OIP_SPEC): tests/support/mlserver.lock | $(BIN)/.installed
	rm -rf $(OIP_DIR)
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --no-deps \
		--only-binary=:all: --require-hashes -r $< -d $(OIP_DIR)
	$(BIN)/python -c 'import sys, zipfile; from pathlib import Path; (wheel,) = Path(sys.argv[1]).glob("mlserver-*.whl"); Path(sys.argv[3]).write_bytes(zipfile.ZipFile(wheel).read(sys.argv[2]))' \
		$(OIP_DIR) $(OIP_SPEC_IN_WHEEL) $@.part
	mv $@.part $@

oip-spec: $(OIP_SPEC)

# What the tests need: the virtualenvs are independent of one another, so
# they install side by side (about half the wall time of one after another).
test-deps: install system-deps bundle checkov oip-spec generator kserve-sdk monitoring-tools

# The unit, deploy and API tiers run on every core (up to 4); the process tier
# after them, alone: its servers, timeouts and load want the machine to
# themselves.
PARALLEL := -n auto --maxprocesses 4

test:
	@$(MAKE) --no-print-directory -j4 -Otarget test-deps
	CHECKOV=$(CHECKOV_VENV)/bin/checkov \
		$(BIN)/python -m pytest $(PARALLEL) --durations=10 tests/unit tests/deploy tests/api
	OIP_SPEC=$(OIP_SPEC) MONITORING_PYTHON=$(MONITORING_VENV)/bin/python \
		$(BIN)/python -m pytest --durations=25 tests/process

test-fast: install
	$(BIN)/python -m pytest $(PARALLEL) tests/unit tests/api

# Throughput and latency against baselines measured in the same run (wrk from
# Debian's archive, installed if missing); ~6 minutes. BENCH_ARGS=--help for knobs.
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Each lock from the extras of pyproject.toml; a lock's existing pins are kept
# (add --upgrade-package NAME to move one). The serve and dev locks are
# constrained to requirements.lock, so every image and venv pins the same versions.
LOCK_COMPILE = $(UV) pip compile pyproject.toml --universal --python-version 3.11 \
	--no-header --annotation-style line --quiet

locks: $(UV)
	$(LOCK_COMPILE) --extra serve --extra train -o requirements.lock
	$(LOCK_COMPILE) --extra serve -c requirements.lock -o requirements-serve.lock
	$(LOCK_COMPILE) --extra dev -c requirements.lock -o requirements-dev.lock
	$(LOCK_COMPILE) --extra monitoring -o requirements-monitoring.lock

schema: install
	$(BIN)/python -m service.manifest > training/manifest.schema.json

# docs/configuration.md from the settings classes (tests/unit/test_docs.py holds it there).
docs: install
	$(BIN)/python -m service.settings_doc docs/configuration.md

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include docker/targets.mk
