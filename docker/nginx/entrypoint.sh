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
set -eu

UPSTREAM_HOST="${UPSTREAM_HOST:-api}"
INTERVAL="${UPSTREAM_RESOLVE_INTERVAL:-2}"

resolve() {
    getent ahostsv4 "$UPSTREAM_HOST" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '
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

current="$(resolve)"
(
    while kill -0 "$NGINX_PID" 2>/dev/null; do
        sleep "$INTERVAL"
        now="$(resolve)"
        if [ -n "$now" ] && [ "$now" != "$current" ]; then
            echo "{\"event\":\"upstream_changed\",\"host\":\"$UPSTREAM_HOST\",\"from\":\"$current\",\"to\":\"$now\"}" >&2
            nginx -c "$CONF" -s reload 2>&1 || true
            current="$now"
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
