from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from starlette.responses import Response

from service.pipeline import PredictionPipeline
from service.schemas import BatchPredictionResponse, ErrorResponse, PredictionResponse

router = APIRouter(tags=["predict"])

_ERRORS: dict[int | str, dict[str, object]] = {
    413: {"model": ErrorResponse, "description": "Body larger than MAX_REQUEST_BYTES."},
    415: {"model": ErrorResponse, "description": "Body is not JSON."},
    422: {"model": ErrorResponse, "description": "Body is not valid for this model."},
    503: {"model": ErrorResponse, "description": "Model not loaded yet."},
}


def _pipeline(request: Request) -> PredictionPipeline:
    pipeline: PredictionPipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise HTTPException(503, "model not loaded", headers={"retry-after": "1"})
    return pipeline


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


async def _json_body(request: Request) -> bytes:
    if not _is_json(request.headers.get("content-type")):
        raise HTTPException(415, "request body must be application/json")
    return await request.body()


def _json(payload: bytes) -> Response:
    return Response(payload, media_type="application/json")


# The request body schemas depend on the bundle, so they are added to the
# OpenAPI document at startup (service.openapi) rather than declared here.
@router.post(
    "/predict",
    response_model=PredictionResponse,
    responses=_ERRORS,
    summary="Predict the class of one instance",
)
async def predict(request: Request) -> Response:
    pipeline = _pipeline(request)
    return _json(await pipeline.predict_one(await _json_body(request)))


@router.post(
    "/predict/batch",
    response_model=BatchPredictionResponse,
    responses=_ERRORS,
    summary="Predict the classes of 1 to MAX_BATCH_SIZE instances in one inference call",
)
async def predict_batch(request: Request) -> Response:
    pipeline = _pipeline(request)
    return _json(await pipeline.predict_batch(await _json_body(request)))
