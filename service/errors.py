"""Every error leaves as JSON saying what is wrong and where, with the request id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.batching import BatchQueueFullError, InferenceError
from service.logs import INTERNAL_ERROR, log_unexpected
from service.middleware import BodyTooLargeError, error_payload, request_id_of
from service.pipeline import RequestBodyError


def error_response(
    request: Request, status: int, detail: Any, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        error_payload(request.scope, detail),
        status,
        headers=dict(headers or {}),
        media_type="application/json",
    )


async def _invalid_body(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestBodyError)
    return error_response(request, 422, exc.errors)


async def _request_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return error_response(request, 422, errors)


async def _too_large(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyTooLargeError)
    return error_response(request, 413, exc.detail, {"connection": "close"})


async def _queue_full(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BatchQueueFullError)
    return error_response(request, 503, f"server busy: {exc}", {"retry-after": "1"})


async def _inference_failed(request: Request, exc: Exception) -> Response:
    # The inputs were valid (validation runs first): the backend failed on a
    # batch. Only that batch's callers see this.
    assert isinstance(exc, InferenceError)
    return error_response(request, 500, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(request, exc.status_code, exc.detail, exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Reaching this is a bug: the tests send every malformed shape they can
    # think of and assert none gets here.
    log_unexpected(exc, request_id_of(request.scope), request.url.path)
    return error_response(request, 500, INTERNAL_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestBodyError, _invalid_body)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(BodyTooLargeError, _too_large)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(BatchQueueFullError, _queue_full)
    app.add_exception_handler(InferenceError, _inference_failed)
    app.add_exception_handler(Exception, _unexpected)
