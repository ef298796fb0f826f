"""HTTP request metrics, recorded by the request middleware."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter
from starlette.types import Scope

from service.metrics.buffered import BufferedGauge, BufferedHistogram
from service.metrics.client_internals import incrementer
from service.metrics.instruments import HTTP_DURATION, HTTP_IN_PROGRESS, HTTP_REQUESTS

# Requests that matched no route share one label value: raw URLs as label
# values would let any client create unbounded series.
UNMATCHED = "none"

# Key ids are the operator's names from the keys file, so the label set is
# bounded by that file; requests without a valid key are not counted here.
API_KEY_REQUESTS = Counter(
    "api_key_requests_total",
    "HTTP requests answered, by the API key that authenticated them.",
    ["key_id", "status"],
    registry=None,
)


class HttpMetrics:
    def __init__(self) -> None:
        # Label children by their values: .labels() validates and locks on
        # every call, a dict lookup does not. Keys are bounded: methods are
        # normalised and handlers are route templates. The gauge and the
        # histogram are buffered (service.metrics.buffered); the counters are
        # written through, by their values' own inc (client_internals.incrementer).
        self._in_progress: dict[str, BufferedGauge] = {}
        self._requests: dict[tuple[str, str, int], Callable[[float], None]] = {}
        self._duration: dict[tuple[str, str], BufferedHistogram] = {}
        self._by_key: dict[tuple[str, int], Callable[[float], None]] = {}

    def start(self, method: str) -> None:
        gauge = self._in_progress.get(method)
        if gauge is None:
            gauge = self._in_progress[method] = BufferedGauge(HTTP_IN_PROGRESS.labels(method))
        gauge.inc()

    def finish(
        self, scope: Scope, method: str, status: int, seconds: float, key_id: str | None = None
    ) -> None:
        # The router (or the fast path) records the matched route in the
        # scope: its template, never the raw path, is the handler label.
        handler = getattr(scope.get("route"), "path", None) or UNMATCHED
        self._in_progress[method].dec()
        key = (method, handler, status)
        count = self._requests.get(key)
        if count is None:
            count = self._requests[key] = incrementer(
                HTTP_REQUESTS.labels(method, handler, str(status))
            )
        count(1)
        duration = self._duration.get((method, handler))
        if duration is None:
            duration = self._duration[method, handler] = BufferedHistogram(
                HTTP_DURATION.labels(method, handler)
            )
        duration.add_one(seconds)
        if key_id is not None:
            count_key = self._by_key.get((key_id, status))
            if count_key is None:
                count_key = self._by_key[key_id, status] = incrementer(
                    API_KEY_REQUESTS.labels(key_id, str(status))
                )
            count_key(1)
