"""HTTP request metrics, recorded by the request middleware."""

from __future__ import annotations

from starlette.types import Scope

from service.metrics.instruments import HTTP_DURATION, HTTP_IN_PROGRESS, HTTP_REQUESTS

# Requests that matched no route share one label value: raw URLs as label
# values would let any client create unbounded series.
UNMATCHED = "none"


class HttpMetrics:
    def start(self, method: str) -> None:
        HTTP_IN_PROGRESS.labels(method).inc()

    def finish(self, scope: Scope, method: str, status: int, seconds: float) -> None:
        # The router records the matched route in the scope: its template,
        # never the raw path, is the handler label.
        handler = getattr(scope.get("route"), "path", None) or UNMATCHED
        HTTP_IN_PROGRESS.labels(method).dec()
        HTTP_REQUESTS.labels(method, handler, str(status)).inc()
        HTTP_DURATION.labels(method, handler).observe(seconds)
