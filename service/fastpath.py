"""POST /predict and /predict/batch served straight from ASGI.

These two routes are the whole point of the service and cost microseconds of
model time, so FastAPI's per-request machinery (routing, dependency solving,
Request and Response objects, the exception middleware) would be most of the
cost. This layer answers them directly with the same pipeline, the same
validation and the same error bodies; the FastAPI routes stay declared for the
OpenAPI document and answer 503 while no model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from service.batching import BatchQueueFullError, InferenceError
from service.logs import INTERNAL_ERROR, log_unexpected
from service.middleware import BodyTooLargeError, request_id_of, send_error, send_json_bytes
from service.pipeline import PredictionPipeline, RequestBodyError


@dataclass(frozen=True)
class RouteTemplate:
    """What the request metrics read from scope["route"] for the handler label."""

    path: str


PREDICT = RouteTemplate("/predict")
PREDICT_BATCH = RouteTemplate("/predict/batch")
_ROUTES = {PREDICT.path: PREDICT, PREDICT_BATCH.path: PREDICT_BATCH}
JSON_REQUIRED = "request body must be application/json"


class ClientDisconnectedError(Exception):
    pass


def is_json_content_type(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _content_type(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class PredictionFastPath:
    def __init__(self, app: Starlette) -> None:
        self.app = app
        # Where the lifespan puts the loaded pipeline.
        self._state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = _ROUTES.get(scope["path"])
            pipeline = getattr(self._state, "pipeline", None) if route else None
            if route is not None and pipeline is not None:
                scope["route"] = route
                await self._predict(scope, receive, send, pipeline, route is PREDICT_BATCH)
                return
        await self.app(scope, receive, send)

    async def _predict(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        pipeline: PredictionPipeline,
        batch: bool,
    ) -> None:
        if not is_json_content_type(_content_type(scope)):
            await send_error(send, scope, 415, JSON_REQUIRED)
            return
        headers: dict[str, str] = {}
        detail: Any
        try:
            body = await _read_body(receive)
            predict = pipeline.predict_batch if batch else pipeline.predict_one
            payload = await predict(body)
        except ClientDisconnectedError:
            return
        except RequestBodyError as exc:
            status, detail = 422, exc.errors
        except BodyTooLargeError as exc:
            status, detail = 413, exc.detail
            headers["connection"] = "close"
        except BatchQueueFullError as exc:
            status, detail = 503, f"server busy: {exc}"
            headers["retry-after"] = "1"
        except InferenceError as exc:
            # Valid inputs, failed backend call: only this batch's callers see it.
            status, detail = 500, str(exc)
        except Exception as exc:
            # A bug: the tests send every malformed shape they can think of and
            # assert none gets here. Outside FastAPI, so answered as FastAPI would.
            log_unexpected(exc, request_id_of(scope), scope["path"])
            status, detail = 500, INTERNAL_ERROR
        else:
            await send_json_bytes(send, 200, payload)
            return
        await send_error(send, scope, status, detail, headers)
