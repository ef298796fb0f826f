#!/bin/sh
# Renders the nginx.conf template and what it includes into OUT_DIR:
#   render.sh SRC_DIR OUT_DIR
# The replicas' addresses are not rendered: entrypoint.sh writes them to
# OUT_DIR/peers/<upstream> (one address:port a line), and canary.sh the
# canary's share to OUT_DIR/canary.share, which upstreams.lua reads in place.
# The proxy's settings, with their defaults (docs/operations.md, "The proxy"):
#   API_KEYS_FILE                 the keys file the service reads (mounted read-only)
#   AUTH                          keys | off: as the service's AUTH (unset: keys
#                                 when API_KEYS_FILE is set or the file exists)
#   PROXY_API_KEY_RATE / _BURST   per API key                       100r/s / 200
#   PROXY_UNAUTHENTICATED_RATE / _BURST
#                                 per address, no valid key while keys are
#                                 required (health probes, bad keys)    5r/s / 10
#   PROXY_OPEN_RATE / _BURST      per address with AUTH=off
#                                                                   100r/s / 200
#   PROXY_UPSTREAM_ADDR_HEADER    on: answers carry X-Upstream-Addr, the
#                                 replica's internal address (debugging)  off
# Rates take nginx's units (r/s or r/m); bursts are requests served at once
# beyond the rate.
set -eu
SRC="$1"
OUT="$2"
if [ -z "${AUTH:-}" ]; then
    if [ -n "${API_KEYS_FILE:-}" ] || [ -e /run/secrets/api-keys ]; then AUTH=keys; else AUTH=off; fi
fi
case "$AUTH" in
    keys|off) ;;
    *) echo "render.sh: AUTH '$AUTH' is not keys or off" >&2; exit 2 ;;
esac
: "${API_KEYS_FILE:=/run/secrets/api-keys}"
: "${PROXY_API_KEY_RATE:=100r/s}"
: "${PROXY_API_KEY_BURST:=200}"
: "${PROXY_UNAUTHENTICATED_RATE:=5r/s}"
: "${PROXY_UNAUTHENTICATED_BURST:=10}"
: "${PROXY_OPEN_RATE:=100r/s}"
: "${PROXY_OPEN_BURST:=200}"
case "${PROXY_UPSTREAM_ADDR_HEADER:-off}" in
    on) UPSTREAM_ADDR_HEADER='add_header X-Upstream-Addr $upstream_addr always;' ;;
    off) UPSTREAM_ADDR_HEADER='# X-Upstream-Addr: off (PROXY_UPSTREAM_ADDR_HEADER)' ;;
    *) echo "render.sh: PROXY_UPSTREAM_ADDR_HEADER '$PROXY_UPSTREAM_ADDR_HEADER' is not on or off" >&2; exit 2 ;;
esac

for value in "$PROXY_API_KEY_RATE" "$PROXY_UNAUTHENTICATED_RATE" "$PROXY_OPEN_RATE"; do
    case "$value" in
        *[!0-9]*r/s|*[!0-9]*r/m|'') echo "render.sh: rate '$value' is not <n>r/s or <n>r/m" >&2; exit 2 ;;
        *r/s|*r/m) ;;
        *) echo "render.sh: rate '$value' is not <n>r/s or <n>r/m" >&2; exit 2 ;;
    esac
done
for value in "$PROXY_API_KEY_BURST" "$PROXY_UNAUTHENTICATED_BURST" "$PROXY_OPEN_BURST"; do
    case "$value" in
        ''|*[!0-9]*) echo "render.sh: burst '$value' is not a whole number" >&2; exit 2 ;;
    esac
done
# Paths go into nginx.conf through sed: plain path characters only.
for named in "API_KEYS_FILE=$API_KEYS_FILE" "OUT_DIR=$OUT"; do
    case "${named#*=}" in
        *[!A-Za-z0-9/._-]*) echo "render.sh: ${named%%=*} '${named#*=}' has unsafe characters" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT/peers"
sed -e "s|\${CONF_DIR}|$OUT|g" \
    -e "s|\${API_KEYS_FILE}|$API_KEYS_FILE|g" \
    -e "s|\${AUTH}|$AUTH|g" \
    -e "s|\${UPSTREAM_ADDR_HEADER}|$UPSTREAM_ADDR_HEADER|g" \
    -e "s|\${PROXY_API_KEY_RATE}|$PROXY_API_KEY_RATE|g" \
    -e "s|\${PROXY_API_KEY_BURST}|$PROXY_API_KEY_BURST|g" \
    -e "s|\${PROXY_UNAUTHENTICATED_RATE}|$PROXY_UNAUTHENTICATED_RATE|g" \
    -e "s|\${PROXY_UNAUTHENTICATED_BURST}|$PROXY_UNAUTHENTICATED_BURST|g" \
    -e "s|\${PROXY_OPEN_RATE}|$PROXY_OPEN_RATE|g" \
    -e "s|\${PROXY_OPEN_BURST}|$PROXY_OPEN_BURST|g" \
    "$SRC/nginx.conf" >"$OUT/nginx.conf"
cp "$SRC/api_keys.js" "$SRC/upstreams.lua" "$OUT/"
# Everything to the primary; entrypoint.sh changes it for a canary.
sh "$SRC/canary.sh" share "$OUT" 0 0
