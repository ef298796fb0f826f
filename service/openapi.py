"""The OpenAPI document: FastAPI's routes plus the fast path's route table.

The fast routes document themselves (their request schemas come from the
loaded bundle), so a route is declared once and documented from that
declaration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

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


def json_body(
    schema: dict[str, Any], *, example: Any = None, extra_media_types: Iterable[str] = ()
) -> dict[str, Any]:
    media = {"schema": schema} | ({"example": example} if example is not None else {})
    content = {"application/json": media}
    for media_type in extra_media_types:
        content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    return {"required": True, "content": content}


def responses(
    components: dict[str, Any],
    ok: type[BaseModel],
    errors: dict[int, str],
    error_model: type[BaseModel],
    *,
    ok_media_types: Iterable[str] = (),
) -> dict[str, Any]:
    ok_content: dict[str, Any] = {"application/json": {"schema": schema_ref(ok, components)}}
    for media_type in ok_media_types:
        ok_content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    documented: dict[str, Any] = {"200": {"description": "OK", "content": ok_content}}
    error_schema = schema_ref(error_model, components)
    for status, description in errors.items():
        documented[str(status)] = {
            "description": description,
            "content": {"application/json": {"schema": error_schema}},
        }
    return documented


def _operation(
    route: FastRoute, components: dict[str, Any], pipeline: PredictionPipeline | None
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": list(route.tags),
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_{route.path.strip('/').replace('/', '_')}".replace(
            "{", ""
        ).replace("}", ""),
    }
    if route.description:
        operation["description"] = route.description
    if route.parameters:
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.parameters
        ]
    operation.update(route.document(components, pipeline))
    return operation


def build_openapi(
    app: FastAPI, fast_routes: Iterable[FastRoute], is_open: Callable[[str], bool] | None
) -> dict[str, Any]:
    """`is_open`: which paths need no API key; None while auth is disabled."""
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
    if is_open is not None:
        declare_api_key_security(document, is_open)
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


def declare_api_key_security(document: dict[str, Any], is_open: Callable[[str], bool]) -> None:
    """Either scheme satisfies every operation except those on open paths.

    Declared while keys are configured; the application rebuilds the document
    when the first key is added or the last one revoked.
    """
    components = document.setdefault("components", {})
    components["securitySchemes"] = SCHEMES
    document["security"] = [{BEARER: []}, {API_KEY: []}]
    error_schema = components.get("schemas", {}).get("ErrorResponse")
    unauthorized: dict[str, Any] = {"description": UNAUTHORIZED}
    if error_schema is not None:
        unauthorized["content"] = {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
        }
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            if is_open(path):
                operation["security"] = []
            else:
                operation.setdefault("responses", {})["401"] = unauthorized
