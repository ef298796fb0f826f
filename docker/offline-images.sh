#!/usr/bin/env bash
# Build stand-in base images from Debian's archive, for machines that cannot
# pull from a container registry (air-gapped users, our CI):
#
#   ml-api/python:offline      debootstrap minbase bookworm + python3 and venv
#                              (`python` on PATH; pip only inside venvs), apt
#                              cleaned and docs/locales excluded like the
#                              official debian slim images
#   ml-api/nginx:offline       Debian's nginx, its njs, Lua and stream modules on that base
#   ml-api/prometheus:offline  Debian's prometheus on that base
#   ml-api/alertmanager:offline  Debian's prometheus-alertmanager on that base
#
# Point compose at them with
#   PYTHON_BASE_IMAGE=ml-api/python:offline NGINX_IMAGE=ml-api/nginx:offline \
#   PROMETHEUS_IMAGE=ml-api/prometheus:offline ALERTMANAGER_IMAGE=ml-api/alertmanager:offline
# (`make up OFFLINE=1` does). Grafana has no such source; the offline stack
# runs without it.
#
# Tags that exist already are kept; FORCE=1 rebuilds everything.
# DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR override the mirrors, which default to
# the ones this machine's apt uses (only the configured archive may be
# reachable).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SUITE="${DEBIAN_SUITE:-bookworm}"
PY_TAG="${OFFLINE_PYTHON_IMAGE:-ml-api/python:offline}"
NGINX_TAG="${OFFLINE_NGINX_IMAGE:-ml-api/nginx:offline}"
PROM_TAG="${OFFLINE_PROMETHEUS_IMAGE:-ml-api/prometheus:offline}"
ALERTMANAGER_TAG="${OFFLINE_ALERTMANAGER_IMAGE:-ml-api/alertmanager:offline}"
FORCE="${FORCE:-0}"

log() { printf '[offline-images] %s\n' "$*" >&2; }

# shellcheck source=docker/apt-retry.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt-retry.sh"
have_image() { [ "$FORCE" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

# The mirror apt uses on this host: deb822 (*.sources) or one-line format.
host_mirror() {
    local want="$1"   # "debian" or "debian-security"
    {
        grep -hE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -E 's/^[[:space:]]*URIs:[[:space:]]*//' | tr ' ' '\n'
        grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
    } | grep -E "/${want}/?\$" | head -n 1 || true
}

DEBIAN_MIRROR="${DEBIAN_MIRROR:-$(host_mirror debian)}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-$(host_mirror debian-security)}"

build_python_base() {
    if have_image "$PY_TAG"; then log "$PY_TAG exists; skipping"; return 0; fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        apt_ apt-get update -qq
        apt_ apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    fi
    local root
    root="$(mktemp -d /tmp/ml-api-rootfs.XXXXXX)"
    # shellcheck disable=SC2064
    trap "umount -l '$root/proc' 2>/dev/null || true; rm -rf '$root'" EXIT
    log "debootstrap $SUITE from $DEBIAN_MIRROR into $root"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata \
        "$SUITE" "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 || { tail -n 40 "$root.log" >&2; exit 1; }
    rm -f "$root.log"

    # apt settings of the official debian images: keep no caches in layers.
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
    cat >"$root/etc/apt/apt.conf.d/docker-no-languages" <<'CONF'
Acquire::Languages "none";
CONF
    cat >"$root/etc/apt/apt.conf.d/docker-gzip-indexes" <<'CONF'
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
CONF
    cat >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests" <<'CONF'
Apt::AutoRemove::SuggestsImportant "false";
CONF
    printf 'APT::Install-Recommends "false";\n' >"$root/etc/apt/apt.conf.d/docker-no-recommends"
    # What debian:*-slim leaves out of every package installed later (nginx,
    # prometheus): documentation and translations, ~35 MB on this base.
    mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CONF
    # No services may start during package installs in an image.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"

    {
        echo "deb $DEBIAN_MIRROR $SUITE main"
        echo "deb $DEBIAN_MIRROR $SUITE-updates main"
        [ -n "$DEBIAN_SECURITY_MIRROR" ] && echo "deb $DEBIAN_SECURITY_MIRROR $SUITE-security main"
    } >"$root/etc/apt/sources.list"

    log "applying $SUITE-updates and security updates"
    mount -t proc proc "$root/proc"
    chroot "$root" /bin/sh -ec '
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get upgrade -y -qq >/dev/null
        apt-get clean
    '
    umount -l "$root/proc"

    # What the official images leave out as well.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/*.log \
        "$root"/var/log/apt/* "$root"/tmp/* "$root"/root/.cache \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/usr/share/lintian/*
    # pip refuses to install into Debian's system Python (PEP 668), as wanted;
    # the project always installs into a venv.

    log "importing $PY_TAG ($(du -sh "$root" | cut -f1) rootfs)"
    tar -C "$root" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        --message "debootstrap --variant=minbase $SUITE + python3 (ml-api offline base)" \
        - "$PY_TAG" >/dev/null
    rm -rf "$root"
    trap - EXIT
}

build_from_base() {
    local tag="$1" dockerfile="$2"
    if have_image "$tag"; then log "$tag exists; skipping"; return 0; fi
    log "building $tag"
    "$HERE/docker-build.sh" -q \
        --build-arg "BASE_IMAGE=$PY_TAG" \
        -f "$dockerfile" -t "$tag" "$HERE/offline" >/dev/null
}

build_python_base
# A stand-in built before the per-API-key limits lacks njs, one built before
# the Swarm monitoring door lacks the stream module, one built before the
# proxy's metrics lacks Lua: rebuild it.
for module in ngx_http_js_module ngx_stream_module ngx_http_lua_module; do
    if have_image "$NGINX_TAG" && ! docker run --rm --entrypoint test "$NGINX_TAG" \
        -e "/usr/lib/nginx/modules/$module.so"; then
        log "$NGINX_TAG has no $module; rebuilding"
        docker image rm "$NGINX_TAG" >/dev/null
    fi
done
build_from_base "$NGINX_TAG" "$HERE/offline/nginx.Dockerfile"
build_from_base "$PROM_TAG" "$HERE/offline/prometheus.Dockerfile"
build_from_base "$ALERTMANAGER_TAG" "$HERE/offline/alertmanager.Dockerfile"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^ml-api/.*:offline' >&2
