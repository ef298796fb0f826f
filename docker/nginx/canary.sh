#!/bin/sh
# The canary's share of requests in the proxy (docs/operations.md, "Canary on
# the stack"):
#
#   canary.sh render OUT_DIR PERCENT STICKY
#       write OUT_DIR/canary.conf, which nginx.conf includes: $ml_api_upstream
#       names the upstream each request goes to. PERCENT 0 sends everything to
#       ml_api (no canary upstream at all, so the canary's name need not
#       resolve); otherwise PERCENT % go to ml_api_canary (the addresses in
#       OUT_DIR/peers/canary, which entrypoint.sh resolves from CANARY_HOST),
#       split per request on nginx's random $request_id, or with STICKY 1 on
#       the API key (Authorization / X-API-Key), so a client stays on one side.
#   canary.sh set PERCENT STICKY
#       what the operator runs in the proxy's container (stack.sh canary, via
#       docker exec): records the wanted share in STATE_DIR and waits until
#       entrypoint.sh's watcher has applied it (it renders and reloads nginx;
#       a reload lets in-flight requests finish on the old workers). The
#       watcher applies a share only while CANARY_HOST resolves; exits 1,
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

render() {
    out="$1" percent="$2" sticky="$3"
    valid "$percent" "$sticky"
    if [ "$sticky" = 1 ]; then key='${http_authorization}${http_x_api_key}'; else key='${request_id}'; fi
    {
        echo "# Rendered by canary.sh: $percent % of requests to the canary (sticky: $sticky)."
        if [ "$percent" = 0 ]; then
            echo "split_clients \"\${request_id}\" \$ml_api_upstream { * ml_api; }"
        else
            # As the primary's upstream in nginx.conf: its addresses are in
            # peers/canary (entrypoint.sh), changed without a reload.
            echo "upstream ml_api_canary {"
            echo "    server 0.0.0.1:8000;"
            echo "    balancer_by_lua_block { require(\"upstreams\").balance(\"canary\") }"
            echo "    keepalive 32;"
            echo "    keepalive_requests 10000;"
            echo "    keepalive_timeout 4s;"
            echo "}"
            if [ "$percent" = 100 ]; then
                echo "split_clients \"$key\" \$ml_api_upstream { 100% ml_api_canary; }"
            else
                echo "split_clients \"$key\" \$ml_api_upstream { $percent% ml_api_canary; * ml_api; }"
            fi
        fi
    } >"$out/canary.conf.part"
    mv "$out/canary.conf.part" "$out/canary.conf"
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
    render) shift; render "$@" ;;
    set) shift; set_share "$@" ;;
    *) echo "usage: canary.sh render OUT_DIR PERCENT STICKY | set PERCENT STICKY" >&2; exit 2 ;;
esac
