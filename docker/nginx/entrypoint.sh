#!/bin/sh
# Entrypoint of the `proxy` service: nginx in the foreground plus a small
# watcher that reloads nginx when the addresses behind UPSTREAM_HOST change.
#
# nginx resolves `server api:8000` once, at (re)load; open-source nginx before
# 1.27.3 cannot re-resolve upstream names by itself. Reloading on change makes
# `docker compose up --scale api=N` and replaced replicas reach the proxy
# without a restart, with the same nginx.conf on the official image and on
# Debian's nginx (ml-api/nginx:offline). A reload is graceful: in-flight
# requests finish on the old workers.
#
# On the Swarm stack (CANARY_HOST set) the watcher also applies the canary's
# share of requests that `canary.sh set` records (stack.sh canary): it renders
# canary.conf and reloads, only while CANARY_HOST resolves, and reloads again
# when the canary's addresses change. A restarted proxy starts at 0 %.
set -eu

UPSTREAM_HOST="${UPSTREAM_HOST:-api}"
INTERVAL="${UPSTREAM_RESOLVE_INTERVAL:-2}"

resolve() {
    getent ahostsv4 "$1" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '
}

# /etc/nginx is mounted read-only: the template is rendered with this
# container's limit settings (render.sh) into a writable directory.
CONF_DIR=/tmp/nginx-conf
sh /etc/nginx/render.sh /etc/nginx "$CONF_DIR"
CONF="$CONF_DIR/nginx.conf"

nginx -t -q -c "$CONF"
nginx -c "$CONF" -g 'daemon off;' &
NGINX_PID=$!

# SIGQUIT/SIGTERM: graceful stop of nginx (QUIT lets in-flight requests end).
stop() {
    kill -QUIT "$NGINX_PID" 2>/dev/null || true
}
trap stop TERM QUIT INT

# "PERCENT STICKY|addresses": the canary share to apply now (0 unless
# CANARY_HOST resolves), and the addresses behind it while it gets any.
canary_state() {
    want="$(cat "$CONF_DIR/canary.want" 2>/dev/null || echo "0 0")"
    addresses=""
    if [ -n "${CANARY_HOST:-}" ] && [ "${want%% *}" != 0 ]; then
        addresses="$(resolve "$CANARY_HOST")"
        [ -n "$addresses" ] || want="0 ${want#* }"
    fi
    echo "$want|$addresses"
}

echo "0 0" >"$CONF_DIR/canary.applied"
current="$(resolve "$UPSTREAM_HOST")"
canary_current="0 0|"
(
    while kill -0 "$NGINX_PID" 2>/dev/null; do
        sleep "$INTERVAL"
        now="$(resolve "$UPSTREAM_HOST")"
        canary_now="$(canary_state)"
        [ -n "$now" ] || continue
        [ "$now" != "$current" ] || [ "$canary_now" != "$canary_current" ] || continue
        if [ "$now" != "$current" ]; then
            echo "{\"event\":\"upstream_changed\",\"host\":\"$UPSTREAM_HOST\",\"from\":\"$current\",\"to\":\"$now\"}" >&2
        fi
        share="${canary_now%%|*}"
        if [ "$canary_now" != "$canary_current" ]; then
            echo "{\"event\":\"canary_changed\",\"host\":\"${CANARY_HOST:-}\",\"from\":\"$canary_current\",\"to\":\"$canary_now\"}" >&2
            # shellcheck disable=SC2086 # "PERCENT STICKY": two arguments
            sh /etc/nginx/canary.sh render "$CONF_DIR" $share
        fi
        if nginx -t -q -c "$CONF" 2>&1; then
            nginx -c "$CONF" -s reload 2>&1 || true
            echo "$share" >"$CONF_DIR/canary.applied"
            current="$now"
            canary_current="$canary_now"
        else
            # Keep what runs; the next turn tries again.
            # shellcheck disable=SC2086
            sh /etc/nginx/canary.sh render "$CONF_DIR" ${canary_current%%|*}
        fi
    done
) &
WATCHER_PID=$!

# `wait` returns early when a trapped signal arrives: keep waiting for nginx.
while :; do
    if wait "$NGINX_PID"; then status=0; else status=$?; fi
    kill -0 "$NGINX_PID" 2>/dev/null || break
done
kill "$WATCHER_PID" 2>/dev/null || true
exit "$status"
