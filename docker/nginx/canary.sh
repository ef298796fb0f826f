#!/bin/sh
# The canary's share of requests in the proxy (docs/operations.md, "Canary on
# the stack"):
#
#   canary.sh share OUT_DIR PERCENT STICKY
#       write OUT_DIR/canary.share, which upstreams.lua reads in place (no
#       reload): PERCENT % of requests go to ml_api_canary (the addresses in
#       OUT_DIR/peers/canary, which entrypoint.sh resolves from CANARY_HOST),
#       split per request on nginx's random $request_id, or with STICKY 1 on
#       the API key (Authorization / X-API-Key), so a client stays on one side.
#   canary.sh set PERCENT STICKY
#       what the operator runs in the proxy's container (stack.sh canary, via
#       docker exec): records the wanted share in STATE_DIR and waits until
#       entrypoint.sh's watcher has applied it (no reload: client connections
#       stay open). The watcher applies a share only while CANARY_HOST
#       resolves; exits 1,
#       saying so, when it is not applied within CANARY_APPLY_TIMEOUT seconds.
set -eu

STATE_DIR="${CANARY_STATE_DIR:-/tmp/nginx-conf}"

valid() {
    case "$1" in
        ''|*[!0-9]*) echo "canary.sh: PERCENT '$1' is not a whole number from 0 to 100" >&2; exit 2 ;;
    esac
    if [ "$1" -gt 100 ]; then
        echo "canary.sh: PERCENT '$1' is not a whole number from 0 to 100" >&2; exit 2
    fi
    case "$2" in
        0|1) ;;
        *) echo "canary.sh: STICKY '$2' is not 0 or 1" >&2; exit 2 ;;
    esac
}

share() {
    out="$1" percent="$2" sticky="$3"
    valid "$percent" "$sticky"
    printf '%s %s\n' "$percent" "$sticky" >"$out/canary.share.part"
    mv "$out/canary.share.part" "$out/canary.share"
}

set_share() {
    percent="$1" sticky="$2"
    valid "$percent" "$sticky"
    want="$percent $sticky"
    printf '%s\n' "$want" >"$STATE_DIR/canary.want.part"
    mv "$STATE_DIR/canary.want.part" "$STATE_DIR/canary.want"
    i=0
    while [ "$i" -lt "${CANARY_APPLY_TIMEOUT:-30}" ]; do
        if [ "$(cat "$STATE_DIR/canary.applied" 2>/dev/null || true)" = "$want" ]; then
            echo "canary: $percent % of requests (sticky: $sticky)"
            return 0
        fi
        sleep 1
        i=$((i + 1))
    done
    echo "canary.sh: $percent % not applied within ${CANARY_APPLY_TIMEOUT:-30} s (does ${CANARY_HOST:-canary} resolve? applied: $(cat "$STATE_DIR/canary.applied" 2>/dev/null || echo none))" >&2
    exit 1
}

case "${1:-}" in
    share) shift; share "$@" ;;
    set) shift; set_share "$@" ;;
    *) echo "usage: canary.sh share OUT_DIR PERCENT STICKY | set PERCENT STICKY" >&2; exit 2 ;;
esac
