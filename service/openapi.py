"""The OpenAPI document: FastAPI's routes plus the fast path's route table.

The fast routes document themselves (their request schemas come from the
loaded bundle), so a route is declared once and documented from that
declaration, operationId included. Written for client generators: every
status a route answers has a named schema (the protocol's error body for
errors), and the API-key schemes and 401s are declared whether keys are
configured or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.errors import is_v2_path

if TYPE_CHECKING:
    from service.fastpath import FastRoute
    from service.pipeline import PredictionPipeline

REF = "#/components/schemas/{model}"


def schema_ref(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    """Add `model` (and what it refers to) to the components; return a reference to it."""
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


BINARY = {"schema": {"type": "string", "format": "binary"}}
Errors = Mapping[int, tuple[str, type[BaseModel]]]


def request_body(
    schema: dict[str, Any], *, example: Any = None, binary: bool = False
) -> dict[str, Any]:
    media = {"schema": schema} | ({"example": example} if example is not None else {})
    content: dict[str, Any] = {"application/json": media}
    if binary:
        content["application/octet-stream"] = BINARY
    # A body offered in two media types is declared optional: openapi-python-client
    # makes it an optional argument either way, and with `required` its code does
    # not import (openapi-python-client#1451). A request without one gets the 400
    # every unreadable body gets.
    return {"required": not binary, "content": content}


def responses(
    components: dict[str, Any], ok: type[BaseModel], errors: Errors, *, binary: bool = False
) -> dict[str, Any]:
    """The 200 (JSON, and the binary form when `binary`) and each error status with its body."""
    ok_content: dict[str, Any] = {"application/json": {"schema": schema_ref(ok, components)}}
    if binary:
        ok_content["application/octet-stream"] = BINARY
    documented: dict[str, Any] = {"200": {"description": "OK", "content": ok_content}}
    for status, (description, body) in errors.items():
        documented[str(status)] = {
            "description": description,
            "content": {"application/json": {"schema": schema_ref(body, components)}},
        }
    return documented


def _operation(
    route: FastRoute, components: dict[str, Any], pipeline: PredictionPipeline | None
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": list(route.tags),
        "summary": route.summary,
        "operationId": route.operation_id,
    }
    if route.description:
        operation["description"] = route.description
    documented = route.document(components, pipeline)
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.parameters
    ] + documented.pop("parameters", [])
    if parameters:
        operation["parameters"] = parameters
    operation.update(documented)
    return operation


def build_openapi(
    app: FastAPI,
    fast_routes: Iterable[FastRoute],
    is_open: Callable[[str], bool],
    keys_required: bool,
) -> dict[str, Any]:
    """`is_open`: which paths need no API key even when keys are configured."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    pipeline: PredictionPipeline | None = getattr(app.state, "pipeline", None)
    components = document.setdefault("components", {}).setdefault("schemas", {})
    paths = document.setdefault("paths", {})
    for route in fast_routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(
            route, components, pipeline
        )
    # After the fast routes: their operations need the security requirement too.
    declare_api_key_security(document, is_open, keys_required)
    if pipeline is None:
        # Not cached: before startup the bundle's schemas are unknown.
        return document
    manifest = pipeline.predictor.manifest
    document["info"]["x-model"] = {"name": manifest.name, "version": manifest.version}
    app.openapi_schema = document
    return document


# The API-key schemes, so Swagger UI's "Authorize" button sends the key and
# clients generated from the document know about it.
BEARER, API_KEY = "bearerAuth", "apiKeyHeader"
SCHEMES: dict[str, dict[str, str]] = {
    BEARER: {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <key>, a key from `make api-key NAME=<id>`.",
    },
    API_KEY: {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same key in an X-API-Key header.",
    },
}
UNAUTHORIZED = "No valid API key (missing, malformed, unknown or revoked)."


def declare_api_key_security(
    document: dict[str, Any], is_open: Callable[[str], bool], keys_required: bool
) -> None:
    """Either scheme satisfies every operation except those on open paths.

    Declared, with the 401s, whether keys are configured or not, so a client
    generated against an open server still knows them once keys are added;
    while none is configured, no key (`{}`) satisfies the requirement too.
    """
    from service.schemas import ErrorResponse
    from service.v2.schemas import V2Error

    components = document.setdefault("components", {})
    components["securitySchemes"] = SCHEMES
    document["security"] = [{BEARER: []}, {API_KEY: []}, *([] if keys_required else [{}])]
    schemas = components.setdefault("schemas", {})
    for path, operations in document.get("paths", {}).items():
        body = V2Error if is_v2_path(path) else ErrorResponse
        for operation in operations.values():
            if is_open(path):
                operation["security"] = []
            else:
                operation.setdefault("responses", {})["401"] = {
                    "description": UNAUTHORIZED,
                    "content": {"application/json": {"schema": schema_ref(body, schemas)}},
                }
