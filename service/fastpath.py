"""The routes answered straight from ASGI, declared once in one table.

Predictions cost microseconds of model time, so FastAPI's per-request
machinery (routing, dependency solving, Request and Response objects, the
exception middleware) would be most of the cost. Each `FastRoute` is declared
once: the fast path dispatches from the table, the OpenAPI document is built
from it (service.openapi), the open set the API-key check leaves alone is
taken from its `public` flag (service.routes.public) and the request metrics
label requests with its path template (scope["route"].path, as FastAPI's own
routes do). Requests that match no route go on to FastAPI.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import (
    MethodNotAllowedError,
    ModelNotLoadedError,
    NotFoundError,
    UnsupportedMediaTypeError,
    is_v2_path,
    send_exception,
)

if TYPE_CHECKING:
    from service.pipeline import PredictionPipeline

JSON = b"application/json"
_PARAMETER = re.compile(r"\{([a-z_]+)\}")
# Templated paths whose match is remembered (see RouteTable.match).
MATCH_MEMO_SIZE = 1024


class ClientDisconnectedError(Exception):
    pass


@dataclass(slots=True)
class FastRequest:
    scope: Scope
    params: dict[str, str]
    body: bytes
    # The application's state (its pipeline, key store): None outside an app.
    state: Any
    server_version: str

    @property
    def pipeline(self) -> PredictionPipeline | None:
        """The pipeline serving, None until the lifespan has loaded one."""
        pipeline: PredictionPipeline | None = getattr(self.state, "pipeline", None)
        return pipeline

    def require_pipeline(self) -> PredictionPipeline:
        pipeline = self.pipeline
        if pipeline is None:
            raise ModelNotLoadedError
        return pipeline

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return bytes(value)
        return None


@dataclass(slots=True)
class FastResponse:
    body: bytes
    status: int = 200
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class BodyTypes:
    accepts: Callable[[str | None], bool]
    description: str


Handler = Callable[[FastRequest], Awaitable[FastResponse]]
# (components, pipeline or None before startup) -> the operation's OpenAPI fields.
Documenter = Callable[[dict[str, Any], "PredictionPipeline | None"], dict[str, Any]]


@dataclass(frozen=True)
class FastRoute:
    method: str
    # The path template: what the router matches and the metrics' handler label.
    path: str
    handler: Handler
    summary: str
    tags: tuple[str, ...]
    document: Documenter
    # The OpenAPI operationId: the function name a generated client gives the route.
    operation_id: str
    # Media types a request body may have (checked before the body is read);
    # None: the route takes no body.
    accepts: BodyTypes | None = None
    description: str | None = None
    # Answered without an API key (probes carry none).
    public: bool = False

    @property
    def parameters(self) -> list[str]:
        return path_parameters(self.path)


def path_parameters(template: str) -> list[str]:
    return _PARAMETER.findall(template)


def template_regex(template: str, *, named: bool = True) -> str:
    """What a path template matches: each {parameter} is one path segment,
    captured under its name unless `named` is False."""
    parts: list[str] = []
    end = 0
    for found in _PARAMETER.finditer(template):
        segment = f"(?P<{found.group(1)}>[^/]+)" if named else "[^/]+"
        parts += [re.escape(template[end : found.start()]), segment]
        end = found.end()
    parts.append(re.escape(template[end:]))
    return "".join(parts)


def is_json_content_type(content_type: str | None) -> bool:
    if content_type is None or content_type == "application/json":
        return True
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


JSON_BODY = BodyTypes(is_json_content_type, "request body must be application/json")


def _content_type(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.decode("latin-1"))
    return None


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        # The usual case: the whole body in one message.
        body: bytes = message.get("body", b"")
        return body
    if message["type"] == "http.disconnect":
        raise ClientDisconnectedError
    chunks: list[bytes] = [message.get("body", b"")]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class RouteTable:
    """Path → {method: route}: static paths by dict lookup, templates by regex."""

    def __init__(self, routes: Iterable[FastRoute]) -> None:
        self.routes = tuple(routes)
        self._static: dict[str, dict[str, FastRoute]] = {}
        self._templated: list[tuple[re.Pattern[str], dict[str, FastRoute]]] = []
        self._matched: dict[str, tuple[dict[str, FastRoute], dict[str, str]]] = {}
        by_path: dict[str, dict[str, FastRoute]] = {}
        for route in self.routes:
            methods = by_path.setdefault(route.path, {})
            if route.method in methods:
                raise ValueError(f"{route.method} {route.path} is declared twice")
            methods[route.method] = route
        for path, methods in by_path.items():
            if path_parameters(path):
                self._templated.append((re.compile(template_regex(path)), methods))
            else:
                self._static[path] = methods

    def match(self, path: str) -> tuple[dict[str, FastRoute], dict[str, str]] | None:
        # The V2 specification's own document writes the server metadata
        # path as /v2/: a trailing slash is the same resource there.
        if len(path) > 3 and path[-1] == "/" and is_v2_path(path):
            path = path[:-1]
        methods = self._static.get(path)
        if methods is not None:
            return methods, {}
        known = self._matched.get(path)
        if known is not None:
            return known[0], dict(known[1])
        for pattern, methods in self._templated:
            found = pattern.fullmatch(path)
            if found is not None:
                params = found.groupdict()
                # Clients repeat the same few paths (/v2/models/iris/infer):
                # remembered, they skip the regexes. Paths come from clients,
                # so the memo is emptied when it is full rather than grow.
                if len(self._matched) >= MATCH_MEMO_SIZE:
                    self._matched.clear()
                self._matched[path] = (methods, params)
                return methods, dict(params)
        return None


class FastPath:
    def __init__(self, app: ASGIApp, routes: Iterable[FastRoute], server_version: str) -> None:
        self.app = app
        self.table = RouteTable(routes)
        self._server_version = server_version
        # Where the lifespan puts the loaded pipeline.
        self._state = getattr(app, "state", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = self.table.match(scope["path"])
        if found is None:
            if is_v2_path(scope["path"]):
                # The V2 namespace is all ours: its 404s answer in its error shape.
                await send_exception(send, scope, NotFoundError(f"no endpoint {scope['path']}"))
                return
            await self.app(scope, receive, send)
            return
        methods, params = found
        method = scope["method"]
        # HEAD is GET without the body, as on FastAPI's routes.
        route = methods.get("GET" if method == "HEAD" else method)
        scope["route"] = route or next(iter(methods.values()))
        try:
            if route is None:
                raise MethodNotAllowedError(
                    sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
                )
            body = b""
            if route.accepts is not None:
                content_type = _content_type(scope)
                if not route.accepts.accepts(content_type):
                    raise UnsupportedMediaTypeError(route.accepts.description)
                body = await read_body(receive)
            request = FastRequest(
                scope,
                params,
                body,
                self._state,
                self._server_version,
            )
            response = await route.handler(request)
        except ClientDisconnectedError:
            return
        except Exception as exc:
            await send_exception(send, scope, exc)
            return
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-type", response.content_type),
                    (b"content-length", b"%d" % len(response.body)),
                    *response.headers,
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if method == "HEAD" else response.body}
        )
