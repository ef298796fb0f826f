#!/bin/sh
# Renders the nginx.conf template and what it includes into OUT_DIR:
#   render.sh SRC_DIR OUT_DIR
# The proxy's settings, with their defaults (docs/operations.md, "The proxy"):
#   API_KEYS_FILE                 the keys file the service reads (mounted read-only)
#   PROXY_API_KEY_RATE / _BURST   per API key                       100r/s / 200
#   PROXY_UNAUTHENTICATED_RATE / _BURST
#                                 per address, no valid key while keys are
#                                 configured (health probes, bad keys)  5r/s / 10
#   PROXY_OPEN_RATE / _BURST      per address while no keys are configured
#                                                                   100r/s / 200
# Rates take nginx's units (r/s or r/m); bursts are requests served at once
# beyond the rate.
set -eu
SRC="$1"
OUT="$2"
: "${API_KEYS_FILE:=/run/secrets/api-keys}"
: "${PROXY_API_KEY_RATE:=100r/s}"
: "${PROXY_API_KEY_BURST:=200}"
: "${PROXY_UNAUTHENTICATED_RATE:=5r/s}"
: "${PROXY_UNAUTHENTICATED_BURST:=10}"
: "${PROXY_OPEN_RATE:=100r/s}"
: "${PROXY_OPEN_BURST:=200}"

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
case "$API_KEYS_FILE" in
    *[!A-Za-z0-9/._-]*) echo "render.sh: API_KEYS_FILE '$API_KEYS_FILE' has unsafe characters" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
sed -e "s|\${API_KEYS_FILE}|$API_KEYS_FILE|g" \
    -e "s|\${PROXY_API_KEY_RATE}|$PROXY_API_KEY_RATE|g" \
    -e "s|\${PROXY_API_KEY_BURST}|$PROXY_API_KEY_BURST|g" \
    -e "s|\${PROXY_UNAUTHENTICATED_RATE}|$PROXY_UNAUTHENTICATED_RATE|g" \
    -e "s|\${PROXY_UNAUTHENTICATED_BURST}|$PROXY_UNAUTHENTICATED_BURST|g" \
    -e "s|\${PROXY_OPEN_RATE}|$PROXY_OPEN_RATE|g" \
    -e "s|\${PROXY_OPEN_BURST}|$PROXY_OPEN_BURST|g" \
    "$SRC/nginx.conf" >"$OUT/nginx.conf"
cp "$SRC/api_keys.js" "$OUT/api_keys.js"
