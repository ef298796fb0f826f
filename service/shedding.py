"""Load shedding: past MAX_CONCURRENCY requests in progress, a worker answers
503 with Retry-After at once instead of queueing without bound.

A worker answers requests one after another on one event loop: a request that
arrives behind N others waits for all of them. The count that matters is
therefore taken when a request arrives, not when the application reaches it
(by then every request that arrived in the same event-loop turn shows the
same, whole count, and all of them would be refused). The worker's HTTP
protocol (service.server.worker) puts the requests in progress at arrival in
the scope under REQUESTS_AHEAD; under any other server (tests, another ASGI
server) this middleware counts the requests inside the application itself.

Health routes and /metrics bypass the bound: probes and Prometheus must see a
busy worker as alive, and they are cheap and few.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import send_error

if TYPE_CHECKING:
    from service.routes.public import OpenPaths

# Scope key: requests this worker had in progress when the request arrived.
REQUESTS_AHEAD = "ml_api.requests_ahead"
RETRY_AFTER_SECONDS = 1


class LoadSheddingMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_concurrency: int,
        exempt_paths: OpenPaths,
        on_shed: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.max_concurrency = max_concurrency
        self.exempt_paths = exempt_paths
        # Counts each refusal (ml_api_requests_shed_total), when metrics are on.
        self.on_shed = on_shed
        # Requests inside the application, for servers that give no REQUESTS_AHEAD.
        self._inside = 0

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine function: it hands back the next app's coroutine (or
        # the refusal) for the caller to await, one frame less a request.
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            return self.app(scope, receive, send)
        ahead = scope.get(REQUESTS_AHEAD)
        if ahead is None:
            return self._counted(scope, receive, send)
        if ahead >= self.max_concurrency:
            return self._refuse(scope, send, ahead)
        return self.app(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._inside >= self.max_concurrency:
            await self._refuse(scope, send, self._inside)
            return
        self._inside += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._inside -= 1

    def _refuse(self, scope: Scope, send: Send, in_progress: int) -> Awaitable[None]:
        if self.on_shed is not None:
            self.on_shed()
        return send_error(
            send,
            scope,
            503,
            f"server busy: {in_progress} requests in progress, the limit is "
            f"{self.max_concurrency}; retry after {RETRY_AFTER_SECONDS} s",
            {"retry-after": str(RETRY_AFTER_SECONDS)},
        )
