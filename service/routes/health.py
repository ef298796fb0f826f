from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from service.pipeline import PredictionPipeline
from service.routes.public import PublicRoute

# Open whatever the keys: probes and load balancers carry no key.
router = APIRouter(tags=["health"], route_class=PublicRoute)


def _pipeline(request: Request) -> PredictionPipeline | None:
    return getattr(request.app.state, "pipeline", None)


@router.get("/health", summary="Overall health and the model version serving")
async def health(request: Request) -> JSONResponse:
    pipeline = _pipeline(request)
    body: dict[str, Any] = {
        "status": "healthy" if pipeline else "unavailable",
        "model_loaded": pipeline is not None,
        "model_version": pipeline.predictor.manifest.version if pipeline else None,
        "auth": "enabled" if request.app.state.keys.enabled else "disabled",
    }
    return JSONResponse(body, status_code=200 if pipeline else 503)


@router.get("/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/health/ready", summary="Readiness: the model is loaded and warmed up")
async def ready(request: Request) -> JSONResponse:
    if _pipeline(request) is None:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse({"status": "ready"})
