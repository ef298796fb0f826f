from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse

from service.pipeline import PredictionPipeline
from service.readiness import unready_reason
from service.routes.public import PublicRoute

# Open whatever the keys: probes and load balancers carry no key.
router = APIRouter(tags=["health"], route_class=PublicRoute)


class Health(BaseModel):
    status: Literal["healthy", "unavailable"]
    model_loaded: bool
    model_version: str | None
    auth: Literal["enabled", "disabled"]


class Liveness(BaseModel):
    status: Literal["alive"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    reason: str | None = None


def _pipeline(request: Request) -> PredictionPipeline | None:
    return getattr(request.app.state, "pipeline", None)


@router.get(
    "/health",
    summary="Overall health and the model version serving",
    operation_id="get_health",
    response_model=None,
    responses={
        200: {"model": Health, "description": "Serving."},
        503: {"model": Health, "description": "No model loaded yet."},
    },
)
async def health(request: Request) -> JSONResponse:
    pipeline = _pipeline(request)
    body: dict[str, Any] = {
        "status": "healthy" if pipeline else "unavailable",
        "model_loaded": pipeline is not None,
        "model_version": pipeline.predictor.manifest.version if pipeline else None,
        "auth": "enabled" if request.app.state.keys.enabled else "disabled",
    }
    return JSONResponse(body, status_code=200 if pipeline else 503)


@router.get(
    "/health/live",
    summary="Liveness: the process answers",
    operation_id="get_liveness",
    response_model=None,
    responses={200: {"model": Liveness, "description": "The process answers."}},
)
async def live() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.get(
    "/health/ready",
    summary="Readiness: the model is loaded and warmed up",
    operation_id="get_readiness",
    response_model=None,
    responses={
        200: {"model": Readiness, "description": "Ready for predictions."},
        503: {
            "model": Readiness,
            "description": "No model loaded yet, or the API keys copy is no longer kept "
            "current (`API_KEYS_URL`).",
        },
    },
)
async def ready(request: Request) -> JSONResponse:
    reason = unready_reason(request.app.state)
    if reason is not None:
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ready"})
