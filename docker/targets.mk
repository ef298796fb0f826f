# Container verbs, included from the top-level Makefile (`-include docker/targets.mk`).
#
#   make image            build ml-api:$(VERSION) (trains the model inside the build)
#   make image MODEL_FILE=model.joblib NAME=... VERSION=x.y.z [REFERENCE_DATA=ref.csv
#              TARGET=col FEATURES=a,b,c]
#                         bake the user's fitted model instead, packaged inside the
#                         build (a model that fails the packager's gates fails it)
#   make up               docker compose up the stack (OFFLINE=1: offline images, no Grafana);
#                         a container that fails to start prints its first error line
#   make down             docker compose down
#   make e2e              end-to-end test: engine, images, compose stack, scale, drain,
#                         swarm rolling update/rollback/scale under load (tests/e2e)
#   make offline-images   Debian-built stand-ins for python/nginx/prometheus images
#   make engine           install/start a Docker engine and the compose plugin if missing
#   make stack-up         deploy/swarm/stack.yaml on this engine's swarm (inits a
#                         single-node swarm when there is none); Prometheus,
#                         Alertmanager (ALERTMANAGER_CONFIG_DIR as for `up`) and
#                         Grafana on this manager's 127.0.0.1 only (elsewhere:
#                         ssh -L 3000:127.0.0.1:3000 <manager>); refuses
#                         without GRAFANA_ADMIN_PASSWORD (or OFFLINE=1 /
#                         GRAFANA_REPLICAS=0: no Grafana)
#   make stack-rollout VERSION=x.y.z
#                         build ml-api:x.y.z and roll the api service to it, one
#                         task at a time; returns when converged or rolled back
#                         (then non-zero, printing the failed task's first error line)
#   make stack-canary VERSION=x.y.z PERCENT=n [STICKY=1]
#                         build ml-api:x.y.z, run it as the canary service beside
#                         the api and send it n % of requests (per request;
#                         STICKY=1: per API key); without VERSION, change the
#                         share of the running canary
#   make stack-promote    roll the api to the canary's version, remove the canary
#   make stack-canary-off send the canary nothing and remove it
#   make stack-scale REPLICAS=n
#   make stack-keys       swap the running stack's API keys for the keys file's
#                         content (swarm secrets are immutable: a new one, rolled
#                         into the api start-first, then into the proxy)
#   make stack-down       remove the stack (and the swarm, if stack-up made it)
#
# Variables: VERSION (model version, 1.0.0), MODEL_NAME, DATASET, OFFLINE (1: use
# the ml-api/*:offline images), REPLICAS (api replicas for `up` and
# `stack-scale`), API_REPLICAS (for `stack-up`, 3).
PYTHON ?= python3
VENV ?= .venv
VERSION ?= 1.0.0
MODEL_NAME ?= iris
DATASET ?= iris
OFFLINE ?=
REPLICAS ?= 1
API_KEYS_FILE ?= secrets/api-keys
API_REPLICAS ?= 3

ifeq ($(OFFLINE),1)
export PYTHON_BASE_IMAGE ?= ml-api/python:offline
export NGINX_IMAGE ?= ml-api/nginx:offline
export PROMETHEUS_IMAGE ?= ml-api/prometheus:offline
export ALERTMANAGER_IMAGE ?= ml-api/alertmanager:offline
# Grafana has no offline image: the offline stack runs without it.
COMPOSE_SERVICES := api proxy prometheus alertmanager
export GRAFANA_REPLICAS ?= 0
OFFLINE_DEP := offline-images
else
COMPOSE_SERVICES :=
OFFLINE_DEP :=
endif

# A packaged model is named by NAME, as for `make package`.
IMAGE_MODEL_NAME = $(if $(MODEL_FILE),$(or $(NAME),$(MODEL_NAME)),$(MODEL_NAME))
DOCKER_ENV = MODEL_VERSION=$(VERSION) MODEL_NAME=$(IMAGE_MODEL_NAME) DATASET=$(DATASET) PYTHON=$(PYTHON) TRAIN_ARGS="$(TRAIN_ARGS)" \
	MODEL_FILE="$(MODEL_FILE)" REFERENCE_DATA="$(REFERENCE_DATA)" TARGET="$(TARGET)" FEATURES="$(FEATURES)" \
	PACKAGE_ARGS="$(PACKAGE_ARGS)"
E2E_PYTHON = $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON))

.PHONY: image up down e2e offline-images engine stack-up stack-rollout stack-scale stack-keys stack-down \
	stack-canary stack-promote stack-canary-off

engine:
	PYTHON=$(PYTHON) docker/ensure-engine.sh start

offline-images: engine
	docker/offline-images.sh

image: engine $(OFFLINE_DEP)
	$(DOCKER_ENV) docker/build-image.sh

up: image
	@test -f "$(API_KEYS_FILE)" || { echo "no API keys file $(API_KEYS_FILE): run 'make api-key NAME=<id>' (or AUTH=off to run the API open)" >&2; exit 2; }
	@# Compose bind-mounts the file into containers that run as other users;
	@# `make api-key` creates it 0600. Digests reveal no key.
	chmod a+r "$(API_KEYS_FILE)"
	API_KEYS_FILE=$(API_KEYS_FILE) $(DOCKER_ENV) docker/compose-up.sh --scale api=$(REPLICAS) $(COMPOSE_SERVICES)
	@echo "API:        http://127.0.0.1:$${PROXY_PORT:-8080}  (try: curl -X POST http://127.0.0.1:$${PROXY_PORT:-8080}/predict -H 'Content-Type: application/json' -d '{\"sepal_length\":5.1,\"sepal_width\":3.5,\"petal_length\":1.4,\"petal_width\":0.2}')"
	@echo "Prometheus: http://127.0.0.1:$${PROMETHEUS_PORT:-9090}"
	@echo "Alerts:     http://127.0.0.1:$${ALERTMANAGER_PORT:-9093}  (receiver: docker/alertmanager/alertmanager.yml)"
	@$(if $(COMPOSE_SERVICES),,echo "Grafana:    http://127.0.0.1:$${GRAFANA_PORT:-3000}")

down:
	$(DOCKER_ENV) docker compose down --remove-orphans

# The swarm stack (deploy/swarm/): same images, PROXY_PORT and OFFLINE=1.
# Both need the keys file (stack.sh refuses without it, as `up` does).
stack-up: image
	API_KEYS_FILE=$(API_KEYS_FILE) $(DOCKER_ENV) API_REPLICAS=$(API_REPLICAS) deploy/swarm/stack.sh up

stack-keys:
	API_KEYS_FILE=$(API_KEYS_FILE) deploy/swarm/stack.sh keys

stack-rollout: image
	$(DOCKER_ENV) deploy/swarm/stack.sh rollout $(VERSION)

stack-scale:
	deploy/swarm/stack.sh scale $(REPLICAS)

# VERSION only when given on the command line: without it, only the share changes.
CANARY_VERSION = $(if $(filter command line,$(origin VERSION)),$(VERSION))
STICKY ?= 0

stack-canary: $(if $(CANARY_VERSION),image)
	@test -n "$(PERCENT)" || { echo "usage: make stack-canary [VERSION=x.y.z] PERCENT=n [STICKY=1]" >&2; exit 2; }
	STICKY=$(STICKY) deploy/swarm/stack.sh canary $(CANARY_VERSION) "$(PERCENT)"

stack-promote:
	deploy/swarm/stack.sh promote

stack-canary-off:
	deploy/swarm/stack.sh canary-off

stack-down:
	deploy/swarm/stack.sh down

# The whole tier: installs/starts the engine when missing (and stops it after,
# if it started it), builds offline images when no registry answers, builds the
# image, runs the stack tests. Set ML_API_OFFLINE=1/0 to skip the registry probe.
e2e: install
	ML_API_E2E=1 MODEL_VERSION=$(VERSION) PYTHON=$(PYTHON) \
		$(E2E_PYTHON) -m pytest tests/e2e -p no:cacheprovider -v -ra --durations=15 $(E2E_ARGS)
