#!/usr/bin/env bash
# The swarm stack's verbs (make stack-up / stack-rollout / stack-scale /
# stack-down call these):
#
#   stack.sh up                deploy deploy/swarm/stack.yaml as $STACK_NAME;
#                              init a single-node swarm first if the engine is
#                              not in one; return when every replica is ready
#                              and a prediction answers through the proxy
#   stack.sh rollout VERSION   roll the api service to $IMAGE_NAME:VERSION (the
#                              image must exist: `make stack-rollout` builds it);
#                              return 0 when the update converged, 1 when swarm
#                              rolled it back, 2 when it paused; on 1 and 2
#                              print why: the failed task's first error line
#   stack.sh scale N           N api replicas; return when converged
#   stack.sh keys              rotate the API keys of the running stack to
#                              the keys file's current content: a new secret
#                              for the `keys` service alone, which the api
#                              tasks and the proxy copy in place (no restart,
#                              no refused connection); return when the proxy
#                              and every api task (all nodes) hold it
#   stack.sh canary [VERSION] PERCENT
#                              run $IMAGE_NAME:VERSION as the `canary` service
#                              beside the api ($CANARY_REPLICAS, 1) and have the
#                              proxy send it PERCENT % of requests, split per
#                              request (STICKY=1: per API key); without VERSION,
#                              change the share of the running canary. The
#                              proxy reloads gracefully: no request is lost
#   stack.sh promote           roll the api to the canary's image (as rollout),
#                              then remove the canary
#   stack.sh canary-off        send the canary nothing, then remove it
#   stack.sh init              only the swarm part of `up`
#   stack.sh preflight         the checks `up` makes before touching the engine
#   stack.sh down              remove the stack; leave the swarm only if `up`
#                              created it, so the engine ends as it was found
#
# Prometheus, Alertmanager (no authentication) and Grafana publish no port:
# swarm would bind every interface of the node. `up` starts a loopback-only
# door to them on the manager (monitoring-door.conf):
# http://127.0.0.1:$PROMETHEUS_PORT, http://127.0.0.1:$ALERTMANAGER_PORT and
# http://127.0.0.1:$GRAFANA_PORT; from elsewhere, an SSH tunnel:
#   ssh -N -L 9090:127.0.0.1:9090 -L 9093:127.0.0.1:9093 -L 3000:127.0.0.1:3000 <manager>
# Run this script on the manager: the door bind-mounts monitoring-door.conf
# from this checkout. Grafana is not deployed with its default password: set
# GRAFANA_ADMIN_PASSWORD (or GRAFANA_REPLICAS=0).
#
# Environment: STACK_NAME (ml-api), IMAGE_NAME (ml-api), MODEL_VERSION (1.0.0),
# PROXY_PORT (8080), PROMETHEUS_PORT (9090), ALERTMANAGER_PORT (9093),
# GRAFANA_PORT (3000), API_REPLICAS (3), NGINX_IMAGE / PROMETHEUS_IMAGE /
# ALERTMANAGER_IMAGE / GRAFANA_IMAGE, ALERTMANAGER_CONFIG_DIR (the directory
# whose alertmanager.yml names the alert receiver: docker/alertmanager, as
# under compose), PYTHON (python3: reads a failed task's log),
# GRAFANA_REPLICAS (1; 0 without a Grafana image), SWARM_ADVERTISE_ADDR
# (127.0.0.1: a single-node swarm reachable from this host only),
# STACK_TIMEOUT (seconds to wait for convergence, 300), API_KEYS_FILE (the
# host's keys file, secrets/api-keys: `make api-key NAME=<id>` writes it; it
# must exist), GRAFANA_ADMIN_PASSWORD, PROXY_API_KEY_RATE and the other proxy
# limits (docs/operations.md, "The proxy").
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STACK_NAME="${STACK_NAME:-ml-api}"
IMAGE_NAME="${IMAGE_NAME:-ml-api}"
TIMEOUT="${STACK_TIMEOUT:-300}"
# The keys service's port (stack.yaml: keys' --port).
KEYS_PORT=8081
# Marks a swarm that `up` initialised, so `down` knows it may leave it.
CREATED_LABEL="io.ml-api.swarm-created-by"
export STACK_NAME IMAGE_NAME

log() { printf '[stack] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

swarm_state() { docker info --format '{{.Swarm.LocalNodeState}}'; }

ensure_swarm() {
    local state
    state="$(swarm_state)"
    case "$state" in
        active) return 0 ;;
        inactive) ;;
        *) die "this engine's swarm state is '$state'; expected active or inactive" ;;
    esac
    local addr="${SWARM_ADVERTISE_ADDR:-127.0.0.1}"
    log "initialising a single-node swarm on $addr (stack-down leaves it again)"
    docker swarm init --advertise-addr "$addr" --listen-addr "$addr:2377" >/dev/null
    docker node update --label-add "$CREATED_LABEL=$STACK_NAME" "$(docker info --format '{{.Swarm.NodeID}}')" >/dev/null
}

# The Alertmanager configuration: compose's, or ALERTMANAGER_CONFIG_DIR's
# (made absolute: stack.yaml's relative paths are relative to deploy/swarm).
alertmanager_config() {
    local dir="${ALERTMANAGER_CONFIG_DIR:-$ROOT/docker/alertmanager}"
    case "$dir" in /*) ;; *) dir="$PWD/$dir" ;; esac
    [ -f "$dir/alertmanager.yml" ] || die "no $dir/alertmanager.yml (ALERTMANAGER_CONFIG_DIR): Alertmanager needs its configuration"
    printf '%s' "$dir"
}

# The configs' names carry a digest of their files: swarm configs are
# immutable, so an edited file must become a new config.
config_tag() {
    (cd "$ROOT" && cat docker/nginx/nginx.conf docker/nginx/entrypoint.sh \
        docker/nginx/render.sh docker/nginx/api_keys.js docker/nginx/canary.sh \
        docker/nginx/upstreams.lua service/auth/keyfile.py service/auth/key_sync.py \
        service/auth/follower_heartbeat.py \
        deploy/swarm/prometheus.yml docker/prometheus/alerts.yml \
        "$ALERTMANAGER_CONFIG_DIR/alertmanager.yml" \
        docker/grafana/provisioning/datasources/prometheus.yml \
        docker/grafana/provisioning/dashboards/ml-api.yml \
        docker/grafana/dashboards/ml-api.json) | sha256sum | cut -c1-12
}

service() { printf '%s_%s' "$STACK_NAME" "$1"; }

# The keys file, as an absolute path (stack.yaml's relative paths would be
# relative to deploy/swarm). Missing: refuse, as `make up` does; docker would
# only say it cannot read the secret's file.
keys_source() {
    local file="${API_KEYS_FILE:-secrets/api-keys}"
    case "$file" in /*) ;; *) file="$PWD/$file" ;; esac
    [ -f "$file" ] || die "no API keys file $file: run 'make api-key NAME=<id>' (an empty file runs the API open)"
    printf '%s' "$file"
}

# Secrets are immutable: a name per content, like the configs.
keys_tag() { sha256sum <"$1" | cut -c1-12; }

# "running/desired" for a service, counting only tasks that are running
# (healthy, for a service with a health check) and meant to be.
replicas_line() { docker service ls --filter "name=$(service "$1")" --format '{{.Name}} {{.Replicas}}' | awk -v n="$(service "$1")" '$1 == n {print $2}'; }

# Why the tasks of a service's IMAGE failed, as one line: the newest such
# task that ended with an error and the first error line of its log
# (docker/first_error.py, which `make up` prints for compose too: "checksum
# mismatch: model.joblib has sha256 ..."), else swarm's error for the task (an
# exit code, a failed health check). `docker service logs` reads a task's log
# on whichever node ran it. Returns 1 when no task of IMAGE failed.
task_failure() {
    local svc image id name img state err reason
    svc="$(service "$1")" image="$2"
    while IFS=$'\t' read -r id name img state err; do
        [ "${img%@*}" = "$image" ] && [ -n "$err" ] || continue
        # An earlier task of a slot is listed as " \_ <name>".
        name="${name##*\\_ }"
        reason="$(timeout 30 docker service logs --raw --no-trunc "$id" 2>&1 \
            | "${PYTHON:-python3}" "$ROOT/docker/first_error.py")" \
            || reason="$err (no error line in its log: docker service logs $id)"
        printf '%s (%s, %s): %s\n' "$name" "$image" "${state,}" "$reason"
        return 0
    done < <(docker service ps --no-trunc \
        --format '{{.ID}}\t{{.Name}}\t{{.Image}}\t{{.CurrentState}}\t{{.Error}}' "$svc")
    return 1
}

wait_converged() {
    local name="$1" deadline=$((SECONDS + TIMEOUT)) line
    while [ "$SECONDS" -lt "$deadline" ]; do
        line="$(replicas_line "$name")"
        if [ -n "$line" ]; then
            local running="${line%%/*}" desired="${line#*/}"
            desired="${desired%% *}"
            if [ "$running" = "$desired" ]; then return 0; fi
        fi
        sleep 1
    done
    docker service ps --no-trunc "$(service "$name")" >&2 || true
    local failure
    failure="$(task_failure "$name" "$(service_image "$name")")" && log "$failure"
    die "$(service "$name") did not converge within ${TIMEOUT}s (replicas: ${line:-none})"
}

wait_for_prediction() {
    local url="http://127.0.0.1:${PROXY_PORT:-8080}" deadline=$((SECONDS + TIMEOUT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if curl -fsS -o /dev/null "$url/health/ready" 2>/dev/null; then
            log "ready: API on $url; Prometheus on http://127.0.0.1:${PROMETHEUS_PORT:-9090}, Alertmanager on http://127.0.0.1:${ALERTMANAGER_PORT:-9093} and Grafana on http://127.0.0.1:${GRAFANA_PORT:-3000}, this host only (elsewhere: ssh -L)"
            return 0
        fi
        sleep 1
    done
    die "the proxy did not answer /health/ready on $url within ${TIMEOUT}s"
}

# Grafana on swarm is reachable by SSH tunnel from anywhere the manager is:
# its default password would be everyone's. Without Grafana, a random one
# fills the stack file's required variable.
preflight() {
    if [ "${GRAFANA_REPLICAS:-1}" != 0 ]; then
        case "${GRAFANA_ADMIN_PASSWORD:-}" in
            ''|admin) die "set GRAFANA_ADMIN_PASSWORD (not empty, not 'admin'), or GRAFANA_REPLICAS=0: on swarm Grafana is not deployed with its default password" ;;
        esac
    else
        : "${GRAFANA_ADMIN_PASSWORD:=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
    fi
    export GRAFANA_ADMIN_PASSWORD
}

monitoring_door() { printf '%s_monitoring-door' "$STACK_NAME"; }

# A plain container on the stack's edge network (swarm cannot publish on one
# address) that publishes Prometheus and Grafana on the manager's loopback
# only. Its configuration is a read-only bind mount of this checkout's file:
# this script runs on the manager, whose engine sees the file.
start_monitoring_door() {
    local door
    door="$(monitoring_door)"
    docker rm -f "$door" >/dev/null 2>&1 || true
    docker run --detach --name "$door" --restart unless-stopped \
        --label "com.docker.stack.namespace=$STACK_NAME" \
        --network "${STACK_NAME}_edge" \
        -p "127.0.0.1:${PROMETHEUS_PORT:-9090}:9090" \
        -p "127.0.0.1:${ALERTMANAGER_PORT:-9093}:9093" \
        -p "127.0.0.1:${GRAFANA_PORT:-3000}:3000" \
        --mount "type=bind,source=$HERE/monitoring-door.conf,target=/etc/nginx/monitoring-door.conf,readonly" \
        --user 65534:65534 --read-only --tmpfs /tmp \
        --cap-drop ALL --security-opt no-new-privileges:true \
        --entrypoint nginx "$NGINX_IMAGE" \
        -e stderr -c /etc/nginx/monitoring-door.conf -g 'daemon off;' >/dev/null
}

stop_monitoring_door() {
    docker rm -f "$(monitoring_door)" >/dev/null 2>&1 || true
}

# Until the door answers on loopback (nginx refuses connections until it
# listens; a proxy that cannot reach Prometheus closes them at once).
wait_for_monitoring_door() {
    local url="http://127.0.0.1:${PROMETHEUS_PORT:-9090}/-/ready" deadline=$((SECONDS + TIMEOUT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        sleep 1
    done
    docker logs --tail 20 "$(monitoring_door)" >&2 || true
    die "Prometheus did not answer on $url (the monitoring door) within ${TIMEOUT}s"
}

# The proxy's image: Debian's nginx with njs and Lua (docker/offline/nginx.Dockerfile;
# the official image has no Lua module), built here unless it exists, as
# compose's `build:` does.
NGINX_IMAGE="${NGINX_IMAGE:-ml-api/nginx:bookworm}"
export NGINX_IMAGE
ensure_proxy_image() {
    docker image inspect "$NGINX_IMAGE" >/dev/null 2>&1 && return 0
    log "building the proxy image $NGINX_IMAGE"
    docker build -q -t "$NGINX_IMAGE" -f "$ROOT/docker/offline/nginx.Dockerfile" \
        --build-arg "BASE_IMAGE=${PYTHON_BASE_IMAGE:-python:3.12-slim-bookworm}" \
        "$ROOT/docker/offline" >/dev/null
}

# The drift rules of the model IMAGE serves (its build generated them from the
# bundle's manifest: /app/prometheus/rules/drift.yml), copied to a new
# temporary file whose path this prints. None in the image: no rules.
image_drift_rules() {
    local file id
    file="$(mktemp "${TMPDIR:-/tmp}/$STACK_NAME-drift-XXXXXX.yml")"
    id="$(docker create "$1")"
    docker cp "$id:/app/prometheus/rules/drift.yml" - 2>/dev/null | tar -xO >"$file" || true
    docker rm "$id" >/dev/null
    [ -s "$file" ] || printf 'groups: []\n' >"$file"
    printf '%s' "$file"
}

rules_tag() { sha256sum <"$1" | cut -c1-12; }

# After a rollout: Prometheus loads the drift rules of the image now served
# (a new config, swapped in; Prometheus restarts onto the same data volume).
refresh_drift_rules() {
    local file name old
    file="$(image_drift_rules "$1")"
    name="$STACK_NAME-drift-rules-$(rules_tag "$file")"
    old="$(docker service inspect "$(service prometheus)" \
        --format '{{range .Spec.TaskTemplate.ContainerSpec.Configs}}{{if eq .File.Name "/etc/prometheus/drift.yml"}}{{.ConfigName}}{{end}}{{end}}')"
    if [ "$old" != "$name" ]; then
        docker config inspect "$name" >/dev/null 2>&1 \
            || docker config create --label "com.docker.stack.namespace=$STACK_NAME" "$name" "$file" >/dev/null
        local before
        before="$(update_field prometheus StartedAt)"
        docker service update --detach --config-rm "$old" \
            --config-add "source=$name,target=/etc/prometheus/drift.yml" "$(service prometheus)" >/dev/null
        # Returns with Prometheus back: nothing after a rollout meets it restarting.
        wait_update prometheus "$before" || die "Prometheus did not take the drift rules of $1 ($name)"
        log "Prometheus loads the drift rules of $1 ($name)"
    fi
    rm -f "$file"
}

cmd_up() {
    preflight
    ensure_proxy_image
    docker image inspect "$IMAGE_NAME:${MODEL_VERSION:-1.0.0}" >/dev/null 2>&1 \
        || die "no image $IMAGE_NAME:${MODEL_VERSION:-1.0.0}: run \`make image VERSION=${MODEL_VERSION:-1.0.0}\` (make stack-up does)"
    API_KEYS_SOURCE="$(keys_source)"
    ALERTMANAGER_CONFIG_DIR="$(alertmanager_config)"
    export ALERTMANAGER_CONFIG_DIR
    ensure_swarm
    CONFIG_TAG="$(config_tag)"
    KEYS_TAG="$(keys_tag "$API_KEYS_SOURCE")"
    DRIFT_RULES_FILE="$(image_drift_rules "$IMAGE_NAME:${MODEL_VERSION:-1.0.0}")"
    DRIFT_TAG="$(rules_tag "$DRIFT_RULES_FILE")"
    export CONFIG_TAG API_KEYS_SOURCE KEYS_TAG DRIFT_RULES_FILE DRIFT_TAG
    log "deploying stack $STACK_NAME (api $IMAGE_NAME:${MODEL_VERSION:-1.0.0}, configs $CONFIG_TAG, keys $KEYS_TAG)"
    # No registry: use the local images as they are.
    docker stack deploy --resolve-image never -c "$HERE/stack.yaml" "$STACK_NAME" >&2
    rm -f "$DRIFT_RULES_FILE"
    start_monitoring_door
    wait_converged api
    wait_converged proxy
    wait_converged prometheus
    wait_converged alertmanager
    wait_for_monitoring_door
    wait_for_prediction
}

# update_field SERVICE FIELD: a field of the service's last update.
update_field() {
    docker service inspect "$(service "$1")" --format "{{if .UpdateStatus}}{{.UpdateStatus.$2}}{{end}}"
}

# wait_update SERVICE STARTED_BEFORE: until the update started after
# STARTED_BEFORE ends. 0 completed, 1 rolled back, 2 paused.
wait_update() {
    local name="$1" before="$2" deadline=$((SECONDS + TIMEOUT)) state="" started
    while [ "$SECONDS" -lt "$deadline" ]; do
        started="$(update_field "$name" StartedAt)"
        state="$(update_field "$name" State)"
        if [ "$started" != "$before" ]; then
            case "$state" in
                completed) return 0 ;;
                rollback_completed)
                    log "update of $(service "$name") rolled back: $(update_field "$name" Message)"
                    return 1 ;;
                paused|rollback_paused)
                    log "update of $(service "$name") $state: $(update_field "$name" Message)"
                    return 2 ;;
            esac
        fi
        sleep 1
    done
    die "the update of $(service "$name") did not finish within ${TIMEOUT}s (state: ${state:-unknown})"
}

# What the failed tasks of IMAGE said, or that none failed (the update was
# paused or rolled back for another reason: swarm's message says which).
report_failure() {
    local failure
    if failure="$(task_failure "$1" "$2")"; then
        log "failed: $failure"
    else
        log "no task of $2 failed with an error: see \`docker service ps --no-trunc $(service "$1")\`"
    fi
}

cmd_rollout() {
    local version="${1:?usage: stack.sh rollout VERSION}"
    local image="$IMAGE_NAME:$version" svc
    svc="$(service api)"
    docker image inspect "$image" >/dev/null 2>&1 || die "no image $image: run \`make stack-rollout VERSION=$version\`"
    docker service inspect "$svc" >/dev/null 2>&1 || die "no service $svc: run \`make stack-up\` first"
    local current
    current="$(docker service inspect "$svc" --format '{{.Spec.TaskTemplate.ContainerSpec.Image}}')"
    if [ "$current" = "$image" ]; then
        log "$svc already runs $image"
        return 0
    fi
    local before status=0
    before="$(update_field api StartedAt)"
    log "rolling $svc from $current to $image (start-first, one task at a time)"
    docker service update --detach --no-resolve-image --image "$image" "$svc" >/dev/null
    wait_update api "$before" || status=$?
    [ "$status" = 0 ] || report_failure api "$image"
    case "$status" in
        0) log "update completed: $svc runs $image"
           refresh_drift_rules "$image" ;;
        1) log "update rolled back; $svc runs $current again" ;;
    esac
    return "$status"
}

# The name of the secret a service mounts as api-keys.
mounted_keys_secret() {
    docker service inspect "$(service "$1")" \
        --format '{{range .Spec.TaskTemplate.ContainerSpec.Secrets}}{{if eq .File.Name "api-keys"}}{{.SecretName}}{{end}}{{end}}'
}

# The running `keys` task on this node (stack.yaml places it on a manager).
keys_task() {
    docker ps -q --filter "label=com.docker.swarm.service.name=$(service keys)" | head -n 1
}

# Swarm secrets are immutable: the keys file's content becomes a new secret,
# which replaces the `keys` task alone (stack.yaml: the api tasks and the
# proxy copy what it serves every second and re-read their copies in place).
# The running task is handed the same file at once, so the copies need not
# wait for its replacement to start and pass its health check.
# Returns once the proxy and every api task, on every node, hold the new file.
cmd_keys() {
    # The wall clock in seconds with a fraction, whatever the locale's point.
    local started="${EPOCHREALTIME/[^0-9]/.}" source secret old digest deadline waited
    source="$(keys_source)"
    docker service inspect "$(service keys)" >/dev/null 2>&1 || die "no service $(service keys): run \`make stack-up\` first"
    secret="$STACK_NAME-api-keys-$(keys_tag "$source")"
    if ! docker secret inspect "$secret" >/dev/null 2>&1; then
        # The stack's label: `stack-down` removes it with the stack.
        docker secret create --label "com.docker.stack.namespace=$STACK_NAME" "$secret" "$source" >/dev/null
    fi
    old="$(mounted_keys_secret keys)"
    local before=""
    if [ "$old" = "$secret" ]; then
        log "$(service keys) serves $secret already"
    else
        log "$(service keys): API keys $old -> $secret"
        before="$(update_field keys StartedAt)"
        # The service first names the new secret, so a task started from now
        # on (a restart too) serves the new keys; then the running task is
        # pushed the same file. Start-first only then: whichever of the two
        # answers a copier, it gets the same keys.
        local task order=stop-first
        task="$(keys_task)"
        [ -z "$task" ] || order=start-first
        docker service update --detach --update-order "$order" --secret-rm "$old" \
            --secret-add "source=$secret,target=api-keys,uid=10001,gid=10001,mode=0400" \
            "$(service keys)" >/dev/null
        if [ -z "$task" ]; then
            log "no $(service keys) task on this node: the copies follow once swarm has replaced it"
        elif ! docker exec -i "$task" python -m service.auth.key_sync push --file /tmp/api-keys \
            <"$source" >/dev/null 2>&1; then
            log "could not push the keys into $(service keys) task ${task:0:12}: copies may take the old and new keys in turn until swarm has replaced it"
        else
            log "pushed into the running $(service keys) task ${task:0:12}; its replacement starts first"
        fi
    fi
    digest="$(sha256sum <"$source" | cut -c1-64)"
    deadline=$((SECONDS + 20))
    local states pending tasks copiers=() name
    # Only services with running tasks: on the internal network a name
    # Docker's DNS does not answer waits out the resolver's timeouts.
    for name in proxy api canary; do
        case "$(replicas_line "$name")" in ""|0/*) ;; *) copiers+=("tasks.$name") ;; esac
    done
    while :; do
        # The keys tasks know what they last gave each copier; asked from
        # inside one, `tasks.*` names every copier, on every node.
        states="$(docker exec "$(keys_task)" python -m service.auth.key_sync copies \
            --sha256 "$digest" --port "$KEYS_PORT" "${copiers[@]}" 2>/dev/null)" || true
        pending="$(grep '^missing ' <<<"$states" | cut -d' ' -f2- | paste -sd, -)" || true
        tasks="$(grep -cE '^held tasks\.(api|canary) ' <<<"$states")" || true
        if [ -z "$pending" ] && grep -q '^held tasks\.proxy ' <<<"$states"; then
            break
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "API keys $secret: not copied yet by ${pending:-the proxy (or no $(service keys) task on this node answered)} (they keep their last keys until they can copy the new ones from $(service keys))"
        sleep 0.3
    done
    # Every reader re-reads its copy within a second of the change (the api's
    # key ring on a request, njs on every request): only then is it live.
    sleep 1.5
    waited="$(awk -v from="$started" -v to="${EPOCHREALTIME/[^0-9]/.}" 'BEGIN { printf "%.1f", to - from }')"
    log "API keys of $STACK_NAME are $secret: live in the proxy and the $tasks api task(s), on every node, after ${waited} s (no restart)"
    if [ "$old" != "$secret" ]; then
        # Live already; the old secret goes once swarm has finished the update
        # (the first update of the service has no earlier start to tell apart).
        wait_update keys "$before" || die "$(service keys) did not finish its update (copies hold $secret)"
        docker secret rm "$old" >/dev/null 2>&1 || true
    fi
}

# The proxy's task container on this node (the proxy runs on a manager:
# run this script on that manager).
proxy_container() {
    local id
    id="$(docker ps -q --filter "label=com.docker.swarm.service.name=$(service proxy)" | head -n 1)"
    [ -n "$id" ] || die "no task of $(service proxy) runs on this node: run stack.sh on the manager that runs it"
    printf '%s' "$id"
}

# The proxy's watcher applies the share (docker/nginx/canary.sh; no reload)
# and this returns once it has.
canary_share() {
    docker exec "$(proxy_container)" sh /etc/nginx/canary.sh set "$1" "$2" >&2
}

service_image() {
    docker service inspect "$(service "$1")" --format '{{.Spec.TaskTemplate.ContainerSpec.Image}}'
}

service_replicas() {
    docker service inspect "$(service "$1")" --format '{{if .Spec.Mode.Replicated}}{{.Spec.Mode.Replicated.Replicas}}{{end}}'
}

cmd_canary() {
    local version="${1:-}" percent="${2:-}" sticky="${STICKY:-0}" svc image
    case "$percent" in
        ''|*[!0-9]*) die "usage: stack.sh canary [VERSION] PERCENT (a whole number from 0 to 100)" ;;
    esac
    [ "$percent" -le 100 ] || die "PERCENT $percent is more than 100"
    case "$sticky" in 0|1) ;; *) die "STICKY is 0 or 1, not '$sticky'" ;; esac
    svc="$(service canary)"
    docker service inspect "$svc" >/dev/null 2>&1 || die "no service $svc: run \`make stack-up\` first"
    if [ -n "$version" ]; then
        image="$IMAGE_NAME:$version"
        docker image inspect "$image" >/dev/null 2>&1 || die "no image $image: run \`make stack-canary VERSION=$version PERCENT=$percent\`"
        if [ "$(service_image canary)" != "$image" ] && [ "$(service_replicas canary)" != 0 ]; then
            # A canary of another version: it goes first, so that every
            # task counted below runs the new one.
            cmd_canary_off
        fi
        log "canary $svc: $image, ${CANARY_REPLICAS:-1} replica(s)"
        docker service update --detach --no-resolve-image --image "$image" \
            --replicas "${CANARY_REPLICAS:-1}" "$svc" >/dev/null
        # Running = healthy: the task is in DNS, ready for the proxy.
        wait_converged canary
    elif [ "$(service_replicas canary)" = 0 ]; then
        die "no canary runs: \`make stack-canary VERSION=x.y.z PERCENT=$percent\`"
    fi
    canary_share "$percent" "$sticky"
    log "canary $(service_image canary): $percent % of requests (sticky: $sticky)"
}

cmd_canary_off() {
    local svc
    svc="$(service canary)"
    docker service inspect "$svc" >/dev/null 2>&1 || die "no service $svc: run \`make stack-up\` first"
    # First nothing to it (requests under way finish), then away with it.
    canary_share 0 0
    docker service scale --detach "$svc=0" >/dev/null
    wait_converged canary
    log "canary removed; every request goes to $(service api) ($(service_image api))"
}

cmd_promote() {
    local image version status=0
    docker service inspect "$(service canary)" >/dev/null 2>&1 || die "no service $(service canary): run \`make stack-up\` first"
    [ "$(service_replicas canary)" != 0 ] || die "no canary runs: nothing to promote"
    image="$(service_image canary)"
    version="${image##*:}"
    [ "$image" = "$IMAGE_NAME:$version" ] || die "the canary runs $image, not an $IMAGE_NAME image"
    log "promoting $image: rolling $(service api) to it, then removing the canary"
    cmd_rollout "$version" || status=$?
    [ "$status" = 0 ] || die "$(service api) did not take $image (rollout ended $status); the canary keeps its share"
    cmd_canary_off
}

cmd_scale() {
    local replicas="${1:?usage: stack.sh scale N}"
    log "scaling $(service api) to $replicas"
    docker service scale --detach "$(service api)=$replicas" >/dev/null
    wait_converged api
}

cmd_down() {
    # Attached to the stack's network: it would keep the network alive.
    stop_monitoring_door
    if docker stack ls --format '{{.Name}}' 2>/dev/null | grep -qx "$STACK_NAME"; then
        log "removing stack $STACK_NAME"
        docker stack rm "$STACK_NAME" >&2
    fi
    # stack rm returns before the tasks and networks are gone.
    local deadline=$((SECONDS + 120))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK_NAME")" ] \
            && [ -z "$(docker network ls -q --filter "label=com.docker.stack.namespace=$STACK_NAME")" ]; then
            break
        fi
        sleep 1
    done
    if [ "$(swarm_state)" != active ]; then return 0; fi
    local creator
    creator="$(docker node inspect "$(docker info --format '{{.Swarm.NodeID}}')" --format "{{index .Spec.Labels \"$CREATED_LABEL\"}}" 2>/dev/null || true)"
    if [ "$creator" != "$STACK_NAME" ]; then
        log "the swarm was there before stack-up: leaving it active"
        return 0
    fi
    if [ -n "$(docker service ls -q)" ]; then
        log "other services still run in the swarm stack-up created: leaving it active"
        return 0
    fi
    log "leaving the single-node swarm stack-up created"
    docker swarm leave --force >/dev/null
    docker network rm docker_gwbridge >/dev/null 2>&1 || true
}

case "${1:-}" in
    up) cmd_up ;;
    init) ensure_swarm ;;
    preflight) preflight ;;
    rollout) shift; cmd_rollout "$@" ;;
    scale) shift; cmd_scale "$@" ;;
    canary) shift
        # One argument: the share of the running canary.
        if [ "$#" -eq 1 ]; then cmd_canary "" "$1"; else cmd_canary "$@"; fi ;;
    canary-off) cmd_canary_off ;;
    promote) cmd_promote ;;
    keys) cmd_keys ;;
    down) cmd_down ;;
    *) echo "usage: $0 up | init | preflight | rollout VERSION | scale N | canary [VERSION] PERCENT | promote | canary-off | keys | down" >&2; exit 2 ;;
esac
