"""The API-key schemes in the OpenAPI document, so Swagger UI's "Authorize"
button sends the key and clients generated from the document know about it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
