"""The e2e stack's alert receiver: the `alert-webhook:9095` that the shipped
docker/alertmanager/alertmanager.yml sends to. Prints each POSTed body as one
JSON line, which the test reads back from the container's log."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        print(json.dumps(json.loads(body)), flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


if __name__ == "__main__":
    print("alert receiver listening on :9095", file=sys.stderr, flush=True)
    ThreadingHTTPServer(("0.0.0.0", 9095), Handler).serve_forever()
