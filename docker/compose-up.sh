#!/usr/bin/env bash
# `make up`: docker compose up -d --wait with the given arguments. When the
# stack does not come up (an api container exited, or stayed unhealthy, as a
# refused model bundle makes it), print why: each failed container's first
# error line (docker/first_error.py), not only compose's "container exited (1)".
set -u
here=$(dirname "$0")
python=${PYTHON:-python3}

docker compose up -d --wait "$@"
status=$?
[ "$status" -eq 0 ] && exit 0

docker compose ps -a --format '{{.Name}}	{{.State}}	{{.Health}}' |
    while IFS=$'\t' read -r name state health; do
        [ "$state" = running ] && [ "$health" != unhealthy ] && continue
        reason=$(docker logs "$name" 2>&1 | "$python" "$here/first_error.py") ||
            reason="no error line in its log (docker logs $name)"
        echo "$name ($state${health:+, $health}): $reason" >&2
    done
exit "$status"
