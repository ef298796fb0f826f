#!/bin/sh
# Entrypoint of the `proxy` service: nginx in the foreground plus a small
# watcher that keeps the addresses behind UPSTREAM_HOST current.
#
# nginx resolves `server api:8000` once, at (re)load; open-source nginx before
# 1.27.3 cannot re-resolve upstream names by itself, and a reload closes every
# idle client keep-alive connection (a client sending on one at that moment
# gets no answer). So the watcher resolves the name every
# UPSTREAM_RESOLVE_INTERVAL seconds and writes the addresses to
# $CONF_DIR/peers/api, which upstreams.lua reads in place: `docker compose up
# --scale api=N`, replaced replicas and rolling updates reach the proxy
# without a reload.
#
# On the Swarm stack (CANARY_HOST set) the watcher also applies the canary's
# share of requests that `canary.sh set` records (stack.sh canary), only while
# CANARY_HOST resolves, and keeps the canary's addresses in peers/canary: no
# reload either. A restarted proxy starts at 0 %.
set -eu

UPSTREAM_HOST="${UPSTREAM_HOST:-api}"
INTERVAL="${UPSTREAM_RESOLVE_INTERVAL:-2}"

resolve() {
    getent ahostsv4 "$1" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '
}

# Writes HOST's addresses to peers/NAME when they changed (and are not none:
# a name that resolves to nothing for a moment does not empty the upstream).
# Prints the addresses.
write_peers() {
    name="$1" host="$2"
    addresses="$(resolve "$host")"
    file="$CONF_DIR/peers/$name"
    if [ -n "$addresses" ]; then
        lines="$(for a in $addresses; do echo "$a:8000"; done)"
        if [ "$lines" != "$(cat "$file" 2>/dev/null || true)" ]; then
            printf '%s\n' "$lines" >"$file.part"
            mv "$file.part" "$file"
            echo "{\"event\":\"upstream_changed\",\"host\":\"$host\",\"to\":\"$addresses\"}" >&2
        fi
    fi
    echo "$addresses"
}

# /etc/nginx is mounted read-only: the template is rendered with this
# container's limit settings (render.sh) into a writable directory.
CONF_DIR=/tmp/nginx-conf
sh /etc/nginx/render.sh /etc/nginx "$CONF_DIR"
CONF="$CONF_DIR/nginx.conf"

write_peers api "$UPSTREAM_HOST" >/dev/null

# On the Swarm stack (KEYS_URL set) the keys file is a copy of what the `keys`
# service serves, kept current beside nginx (service/auth/key_sync.py, mounted
# under /etc/nginx/keysync); njs re-reads it in place. Readable by the
# workers (`nobody`), as the compose secret is.
if [ -n "${KEYS_URL:-}" ]; then
    keysync() {
        PYTHONPATH=/etc/nginx/keysync python3 -m service.auth.key_sync "$1" \
            --url "$KEYS_URL" --file "$API_KEYS_FILE" --mode 0644
    }
    keysync sync || echo "{\"event\":\"api_keys_not_copied\",\"url\":\"$KEYS_URL\"}" >&2
    # The follower never ends by itself; one that is killed is replaced, as
    # a copy nobody keeps current would go on accepting revoked keys (`||`:
    # under set -e its exit status would end the loop instead).
    (
        while :; do
            keysync follow || echo "{\"event\":\"api_keys_follower_restarted\",\"exit\":$?}" >&2
            sleep 1
        done
    ) &
fi

nginx -t -q -c "$CONF"
nginx -c "$CONF" -g 'daemon off;' &
NGINX_PID=$!

# SIGQUIT/SIGTERM: graceful stop of nginx (QUIT lets in-flight requests end).
stop() {
    kill -QUIT "$NGINX_PID" 2>/dev/null || true
}
trap stop TERM QUIT INT

# "PERCENT STICKY": the canary share to apply now (0 unless CANARY_HOST
# resolves).
canary_share() {
    want="$(cat "$CONF_DIR/canary.want" 2>/dev/null || echo "0 0")"
    if [ -n "${CANARY_HOST:-}" ] && [ "${want%% *}" != 0 ] && [ -z "$(write_peers canary "$CANARY_HOST")" ]; then
        want="0 ${want#* }"
    fi
    echo "$want"
}

echo "0 0" >"$CONF_DIR/canary.applied"
applied="0 0"
(
    while kill -0 "$NGINX_PID" 2>/dev/null; do
        sleep "$INTERVAL"
        write_peers api "$UPSTREAM_HOST" >/dev/null
        share="$(canary_share)"
        [ "$share" != "$applied" ] || continue
        echo "{\"event\":\"canary_changed\",\"host\":\"${CANARY_HOST:-}\",\"from\":\"$applied\",\"to\":\"$share\"}" >&2
        # shellcheck disable=SC2086 # "PERCENT STICKY": two arguments
        sh /etc/nginx/canary.sh share "$CONF_DIR" $share
        # Every nginx worker re-reads it within a second (upstreams.lua):
        # only then is it applied.
        sleep 1
        echo "$share" >"$CONF_DIR/canary.applied"
        applied="$share"
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
