#!/usr/bin/env bash
# A second swarm node on this machine, for testing the stack across two
# engines: a dockerd in its own network namespace, data root and containerd
# namespace, joined to this engine's swarm over a veth pair.
#
#   second-node.sh up            the namespace, the veth pair ($HOST_ADDR on
#                                this side) and node 2's dockerd
#   second-node.sh join IMAGE... join this engine's swarm (initialised on
#                                $HOST_ADDR: SWARM_ADVERTISE_ADDR=$HOST_ADDR
#                                stack.sh init) and copy the images into node 2
#                                (there is no registry)
#   second-node.sh down          leave the swarm, stop node 2's dockerd by its
#                                pidfile, delete the namespace, its mounts and
#                                directories
#   second-node.sh docker ARGS   the docker CLI against node 2
#
# Needs root (namespaces, a dockerd). Environment: NODE2_NAME (ml-api-node2),
# HOST_ADDR (10.231.0.1), NODE2_ADDR (10.231.0.2); the two bridge/pool ranges
# below must not clash with the first engine's.
set -euo pipefail

NAME="${NODE2_NAME:-ml-api-node2}"
HOST_ADDR="${HOST_ADDR:-10.231.0.1}"
NODE2_ADDR="${NODE2_ADDR:-10.231.0.2}"
PREFIX="${NODE2_PREFIX:-24}"
STATE="/var/lib/$NAME"
RUN="/run/$NAME"
SOCK="$RUN/docker.sock"
PIDFILE="$RUN/dockerd.pid"
LOG="/tmp/$NAME-dockerd.log"
VETH_HOST="${NAME:0:8}-h"
VETH_NODE="${NAME:0:8}-n"

log() { printf '[second-node] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
node2() { docker -H "unix://$SOCK" "$@"; }

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        die "node 2 already runs (pid $(cat "$PIDFILE")); run down first"
    fi
    mkdir -p "$STATE" "$RUN"

    log "network namespace $NAME, veth $VETH_HOST ($HOST_ADDR) <-> $VETH_NODE ($NODE2_ADDR)"
    ip netns add "$NAME"
    ip link add "$VETH_HOST" type veth peer name "$VETH_NODE"
    ip link set "$VETH_NODE" netns "$NAME"
    ip addr add "$HOST_ADDR/$PREFIX" dev "$VETH_HOST"
    ip link set "$VETH_HOST" up
    ip -n "$NAME" link set lo up
    ip -n "$NAME" addr add "$NODE2_ADDR/$PREFIX" dev "$VETH_NODE"
    ip -n "$NAME" link set "$VETH_NODE" up
    ip -n "$NAME" route add default via "$HOST_ADDR"

    log "starting dockerd for node 2 (log: $LOG)"
    # nsenter, not `ip netns exec`: the latter remounts /sys, which hides the
    # cgroup mounts dockerd needs. PREFER_OFFLINE_IMAGE: no registry lookups
    # for images that are present.
    DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 setsid nsenter --net="/run/netns/$NAME" \
        dockerd --data-root "$STATE" --exec-root "$RUN/exec" --pidfile "$PIDFILE" \
        -H "unix://$SOCK" --containerd-namespace "$NAME" \
        --containerd-plugins-namespace "$NAME-plugins" \
        --bip 10.233.0.1/24 --default-address-pool base=10.234.0.0/16,size=24 \
        >"$LOG" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        node2 info >/dev/null 2>&1 && break
        sleep 0.5
    done
    node2 info >/dev/null 2>&1 || { tail -n 30 "$LOG" >&2; die "node 2's dockerd did not answer"; }
}

join() {
    [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ] \
        || die "this engine is not in a swarm (SWARM_ADVERTISE_ADDR=$HOST_ADDR stack.sh init)"
    local token
    token="$(docker swarm join-token -q worker)"
    log "joining the swarm at $HOST_ADDR:2377"
    node2 swarm join --advertise-addr "$NODE2_ADDR" --listen-addr "$NODE2_ADDR:2377" \
        --token "$token" "$HOST_ADDR:2377" >/dev/null
    if [ "$#" -gt 0 ]; then
        log "copying images: $*"
        docker save "$@" | node2 load -q >/dev/null
    fi
    node2 info --format 'node 2: {{.Swarm.NodeID}} {{.Swarm.LocalNodeState}}' >&2
}

down() {
    local id=""
    if node2 info >/dev/null 2>&1; then
        id="$(node2 info --format '{{.Swarm.NodeID}}')"
        node2 swarm leave --force >/dev/null 2>&1 || true
    fi
    if [ -n "$id" ] && [ "$(docker info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null)" = true ]; then
        docker node rm --force "$id" >/dev/null 2>&1 || true
    fi
    if [ -f "$PIDFILE" ]; then
        local pid
        pid="$(cat "$PIDFILE")"
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping node 2's dockerd (pid $pid)"
            kill -TERM "$pid"
            for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
    fi
    ip netns del "$NAME" 2>/dev/null || true
    ip link del "$VETH_HOST" 2>/dev/null || true
    # Mounts dockerd left behind (overlay layers, namespace files), deepest first.
    awk -v a="$STATE" -v b="$RUN" '$2 ~ "^"a || $2 ~ "^"b {print $2}' /proc/mounts | sort -r \
        | while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
    rm -rf "$STATE" "$RUN"
    log "node 2 removed"
}

case "${1:-}" in
    up) up ;;
    join) shift; join "$@" ;;
    down) down ;;
    docker) shift; node2 "$@" ;;
    *) echo "usage: $0 up | join [IMAGE...] | down | docker ARGS..." >&2; exit 2 ;;
esac
