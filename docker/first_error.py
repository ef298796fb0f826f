"""The reason a container failed: the first error line of its log, read on stdin.

`make up` (docker/compose-up.sh) prints it for each api container that exited
or stayed unhealthy, so a failed or refused start says why on the terminal
(`checksum mismatch: model.joblib has sha256 ...`) instead of only
"container exited (1)" with the reason left in the container's log.

Understood: Gunicorn's own lines (`[time] [pid] [ERROR] message`), the
service's JSON lines (`"level": "ERROR"` or `"CRITICAL"`), and a Python
exception's last line (`ValueError: ...`); a `docker compose logs` prefix
(`api-1  | `) is dropped. Standard library only: it runs on the host, outside
any virtualenv.

    docker logs ml-api-api-1 2>&1 | python3 docker/first_error.py
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable

ERROR_LEVELS = frozenset({"ERROR", "CRITICAL"})
_COMPOSE_PREFIX = re.compile(r"^[\w.-]+\s+\| ")
_GUNICORN = re.compile(r"^\[[^\]]+\] \[\d+\] \[(?P<level>[A-Z]+)\] (?P<message>.+)$")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception): .+$")


def _error_message(line: str) -> str | None:
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        if str(record.get("level", "")).upper() not in ERROR_LEVELS:
            return None
        message = record.get("message") or record.get("msg")
        return str(message) if message else None
    gunicorn = _GUNICORN.match(line)
    if gunicorn is not None:
        return gunicorn["message"] if gunicorn["level"] in ERROR_LEVELS else None
    return line if _EXCEPTION.match(line) else None


def first_error(lines: Iterable[str]) -> str | None:
    """The first line of a log that reports an error, without its decoration."""
    for raw in lines:
        line = _COMPOSE_PREFIX.sub("", raw.strip(), count=1)
        message = _error_message(line)
        if message:
            return message
    return None


def main() -> int:
    found = first_error(sys.stdin)
    if found is None:
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
