"""Every error leaves as JSON saying what is wrong and where.

Each exception the service raises on purpose carries its answer (as
MLServer's errors do): its kind the status, the instance the detail and the
headers. The fast path, the middleware and FastAPI's exception handlers all
answer through `answer_for`. The body shape depends on the API family:
ml-api's own routes answer `{"detail": ..., "request_id": ...}`, the Open
Inference Protocol routes under /v2 answer `{"error": "..."}` as that
protocol requires.

A leaf: the outermost middleware imports it, so it imports nothing of the
prediction path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Scope, Send

from service.logs import INTERNAL_ERROR, log_unexpected

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

V2_PREFIX = "/v2"


class ServiceError(Exception):
    """An exception that is an answer: the status its kind says, its detail and headers."""

    status = 500

    def __init__(self, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class ClientError(ServiceError):
    """A request the service refuses, with the status and message to answer it with."""

    status = 400


class NotFoundError(ClientError):
    status = 404


class MethodNotAllowedError(ClientError):
    status = 405

    def __init__(self, allowed: list[str]) -> None:
        super().__init__("Method Not Allowed", {"allow": ", ".join(allowed)})


class UnsupportedMediaTypeError(ClientError):
    status = 415


class ModelNotLoadedError(ClientError):
    status = 503

    def __init__(self) -> None:
        super().__init__("model not loaded", {"retry-after": "1"})


class BodyTooLargeError(ServiceError):
    status = 413

    def __init__(self, limit: int, size: int | None = None) -> None:
        of_size = f" of {size} bytes" if size is not None else ""
        super().__init__(
            f"request body{of_size} exceeds the limit of {limit} bytes", {"connection": "close"}
        )
        self.limit = limit


@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    detail: Any
    headers: dict[str, str] = field(default_factory=dict)


def answer_for(exc: Exception, scope: Scope) -> ErrorAnswer:
    if isinstance(exc, ServiceError):
        return ErrorAnswer(exc.status, exc.detail, exc.headers)
    if isinstance(exc, HTTPException):
        # FastAPI's routing: its 404 and 405.
        return ErrorAnswer(exc.status_code, exc.detail, dict(exc.headers or {}))
    # A bug: the tests send every malformed shape they can think of and
    # assert none gets here.
    log_unexpected(exc, request_id_of(scope), scope["path"])
    return ErrorAnswer(500, INTERNAL_ERROR)


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state")
    return state.get("request_id") if isinstance(state, dict) else None


def is_v2_path(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def _message(detail: Any) -> str:
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(map(str, item.get('loc', [])))}: {item.get('msg')}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        )
    return str(detail)


def error_payload(scope: Scope, detail: Any) -> bytes:
    if is_v2_path(scope["path"]):
        return orjson.dumps({"error": _message(detail)})
    return orjson.dumps({"detail": detail, "request_id": request_id_of(scope)})


async def send_json_bytes(
    send: Send,
    status: int,
    payload: bytes,
    headers: dict[str, str] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    raw_headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(payload))]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


async def send_error(
    send: Send, scope: Scope, status: int, detail: Any, headers: dict[str, str] | None = None
) -> None:
    await send_json_bytes(send, status, error_payload(scope, detail), headers)


async def send_exception(send: Send, scope: Scope, exc: Exception) -> None:
    answer = answer_for(exc, scope)
    await send_error(send, scope, answer.status, answer.detail, answer.headers)


async def _handle(request: Request, exc: Exception) -> Response:
    answer = answer_for(exc, request.scope)
    return Response(
        error_payload(request.scope, answer.detail),
        answer.status,
        headers=answer.headers,
        media_type="application/json",
    )


def install_error_handlers(app: FastAPI) -> None:
    # Only what FastAPI's own routes can raise: predictions never reach FastAPI
    # (the fast path answers them), and FastAPI's routes take no parameters.
    app.add_exception_handler(HTTPException, _handle)
    app.add_exception_handler(ClientError, _handle)
    app.add_exception_handler(Exception, _handle)
