"""Container health probe: GET /health/ready on the local Gunicorn.

Used by the image's HEALTHCHECK (no curl in the image). Exits 0 when the
service answers 200, 1 otherwise. Reads the port the service binds to from
BIND or PORT, like gunicorn.conf.py does.
"""

import os
import sys
import urllib.request


def main() -> int:
    bind = os.environ.get("BIND", "")
    port = os.environ.get("PORT", "8000")
    if bind and ":" in bind and not bind.startswith("unix:"):
        port = bind.rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=2.5) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
