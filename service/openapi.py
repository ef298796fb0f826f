"""The OpenAPI document, completed with the request schemas of the loaded bundle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.openapi_security import declare_api_key_security
from service.pipeline import PredictionPipeline

REF = "#/components/schemas/{model}"


def _request_body(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
    }


def build_openapi(app: FastAPI, is_open: Callable[[str], bool]) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    declare_api_key_security(document, is_open)
    pipeline: PredictionPipeline | None = getattr(app.state, "pipeline", None)
    if pipeline is None:
        # Not cached: before startup the bundle's schemas are unknown.
        return document
    components = document.setdefault("components", {}).setdefault("schemas", {})
    paths = document["paths"]
    paths["/predict"]["post"]["requestBody"] = _request_body(pipeline.models.instance, components)
    paths["/predict/batch"]["post"]["requestBody"] = _request_body(
        pipeline.models.batch, components
    )
    for path, model in (
        ("/predict", pipeline.models.response),
        ("/predict/batch", pipeline.models.batch_response),
    ):
        # Classification or regression answers, as this bundle gives them.
        schema = model.model_json_schema(ref_template=REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        ok = paths[path]["post"]["responses"]["200"]["content"]["application/json"]
        ok["schema"] = {"$ref": REF.format(model=model.__name__)}
    manifest = pipeline.predictor.manifest
    document["info"]["x-model"] = {"name": manifest.name, "version": manifest.version}
    app.openapi_schema = document
    return document
