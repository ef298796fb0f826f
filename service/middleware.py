"""Pure ASGI middleware (no per-request Request objects): request ids, the
access log, and the request body limit. API keys: service.auth."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Re-exported: the helpers every ASGI layer answers errors with.
from service.errors import BodyTooLargeError as BodyTooLargeError
from service.errors import error_payload as error_payload
from service.errors import request_id_of as request_id_of
from service.errors import send_error as send_error
from service.errors import send_exception
from service.errors import send_json_bytes as send_json_bytes
from service.logs import AccessLog

if TYPE_CHECKING:
    # Imported only for typing: with metrics disabled prometheus_client is never loaded.
    from service.metrics.http import HttpMetrics

NOT_COUNTED = frozenset({"/metrics"})
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that left before the answer
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    # Any other token becomes "other", so clients cannot mint label values.
    return method if method in KNOWN_METHODS else "other"


REQUEST_ID_HEADER = b"x-request-id"
# Ids from clients or the proxy are echoed into logs and headers: keep them short and inert.
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@-]{1,128}")


# Drawn this many at a time: one draw's hex digits, cut into ids, cost a
# fraction of drawing and formatting each id on its own.
_IDS_PER_DRAW = 128
_drawn_ids: list[str] = []
# A child must not hand out ids its parent drew before the fork.
os.register_at_fork(after_in_child=_drawn_ids.clear)


def new_request_id() -> str:
    """128 random bits as 32 hex digits, like uuid4().hex. An id names a request
    and guards nothing: the random module's generator, which Python reseeds from
    the OS in every forked child, instead of a getrandom() system call a request."""
    if not _drawn_ids:
        digits = random.randbytes(16 * _IDS_PER_DRAW).hex()
        _drawn_ids.extend(digits[start : start + 32] for start in range(0, len(digits), 32))
    return _drawn_ids.pop()


class RequestContextMiddleware:
    """Assigns the request id (kept from X-Request-ID when sane), echoes it,
    records the HTTP metrics and writes one JSON access-log line per request."""

    def __init__(
        self, app: ASGIApp, access_log: AccessLog, metrics: HttpMetrics | None = None
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER and _VALID_REQUEST_ID.fullmatch(value):
                request_id = value.decode()
                break
        if request_id is None:
            request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        encoded_id = request_id.encode()
        # Stays None only if no response was started: the client went away (499).
        status: int | None = None
        method = scope["method"]
        if method not in KNOWN_METHODS:
            method = method_label(method)
        metrics = None if scope["path"] in NOT_COUNTED else self.metrics
        if metrics is not None:
            metrics.start(method)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, encoded_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            seconds = time.perf_counter() - start
            status = status or CLIENT_CLOSED_REQUEST
            # Set by the API-key middleware when the request carried a valid key.
            key_id = scope["state"].get("key_id")
            if metrics is not None:
                metrics.finish(scope, method, status, seconds, key_id)
            self.access_log.write_request(
                scope["method"],
                scope["path"],
                status,
                # Whole microseconds: round(x, 3) costs several times more.
                round(seconds * 1_000_000) / 1000,
                request_id,
                scope["client"][0] if scope.get("client") else None,
                key_id,
            )


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, without reading them whole: a declared
    Content-Length is refused before any body is read, and a chunked body is
    cut off as soon as the received bytes pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine function: it hands back the next app's coroutine (or
        # the refusal) for the caller to await, one frame less a request.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                # Past the limit's digit count it is over the limit; int() of
                # thousands of digits would raise (CPython's int digit limit).
                size = int(value) if len(value) <= len(str(self.max_bytes)) else self.max_bytes + 1
                if size > self.max_bytes:
                    return send_exception(send, scope, BodyTooLargeError(self.max_bytes, size))
                # The HTTP parser delivers exactly the declared length (the
                # rest is the next request): nothing left to count.
                return self.app(scope, receive, send)
        return self._counting(scope, receive, send)

    async def _counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
