#!/usr/bin/env bash
# Installs what the tests need from Debian's archive: Prometheus, promtool and
# Alertmanager, nginx with its njs module (the per-key rate limits) and its Lua
# module (the proxy's metrics), libgomp1
# (OpenMP) for LightGBM, Chromium (headless: the drift report renders). Package
# scripts must not start a system Prometheus, Alertmanager or nginx beside ours.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d' EXIT
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    prometheus prometheus-alertmanager nginx-light libnginx-mod-http-js libnginx-mod-http-lua \
    libgomp1 chromium >/dev/null
command -v prometheus promtool prometheus-alertmanager nginx chromium
