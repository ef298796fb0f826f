#!/usr/bin/env bash
# `docker build` with BuildKit, through whichever CLI can do it on this machine:
#   1. the buildx plugin when it is installed (Docker Desktop, docker-ce);
#   2. else Debian's docker.io client (/usr/bin/docker, 20.10), whose built-in
#      BuildKit client needs only DOCKER_BUILDKIT=1;
#   3. else plain `docker build` with DOCKER_BUILDKIT=1.
# (A docker >= 23 CLI without buildx refuses DOCKER_BUILDKIT=1, hence the order.)
# Arguments are those of `docker build`; the result is loaded into the engine.
set -euo pipefail
export DOCKER_BUILDKIT=1
if docker buildx version >/dev/null 2>&1; then
    exec docker buildx build --load "$@"
fi
for cli in /usr/bin/docker docker; do
    if command -v "$cli" >/dev/null 2>&1; then
        major="$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)"
        if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then
            exec "$cli" build "$@"
        fi
    fi
done
exec docker build "$@"
