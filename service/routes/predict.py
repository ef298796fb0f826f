from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from starlette.responses import Response

from service.fastpath import JSON_REQUIRED, is_json_content_type
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


async def _json_body(request: Request) -> bytes:
    if not is_json_content_type(request.headers.get("content-type")):
        raise HTTPException(415, JSON_REQUIRED)
    return await request.body()


def _json(payload: bytes) -> Response:
    return Response(payload, media_type="application/json")


# Once the model is loaded, service.fastpath answers these two routes before
# FastAPI routing; these handlers document them (the request body schemas
# depend on the bundle and are added by service.openapi) and answer 503 until
# the model is loaded.
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
