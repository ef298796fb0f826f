"""Container health probe: GET /health/ready on the local Gunicorn.

Used by the image's HEALTHCHECK and by the swarm stack, where it gates a
task's entry into DNS and the rolling update (no curl in the image). Exits 0
when the service answers 200, 1 otherwise. Reads the port the service binds
to from BIND or PORT, like gunicorn.conf.py does.

A bare socket and no urllib: this runs every two seconds in every replica,
often on a busy machine, and importing urllib.request (http.client, email,
ssl) costs more than the check itself; a slow probe is a failed probe.
"""

import os
import socket
import sys


def main() -> int:
    bind = os.environ.get("BIND", "")
    port = os.environ.get("PORT", "8000")
    if bind and ":" in bind and not bind.startswith("unix:"):
        port = bind.rsplit(":", 1)[1]
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=2.5) as conn:
            conn.sendall(b"GET /health/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
            status_line = conn.makefile("rb").readline(256)
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    parts = status_line.split()
    if len(parts) >= 2 and parts[1] == b"200":
        return 0
    print(f"unhealthy: {status_line[:100]!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
