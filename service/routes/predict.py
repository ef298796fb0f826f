"""The prediction routes as FastAPI sees them: their OpenAPI documentation,
and the answer while no model is loaded.

Once the lifespan has loaded the model, service.fastpath answers both routes
before FastAPI is reached, with the same validation and error bodies. The
request body schemas depend on the bundle and are added to the OpenAPI
document by service.openapi.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from service.schemas import BatchPredictionResponse, ErrorResponse, PredictionResponse

router = APIRouter(tags=["predict"])

_ERRORS: dict[int | str, dict[str, object]] = {
    413: {"model": ErrorResponse, "description": "Body larger than MAX_REQUEST_BYTES."},
    415: {"model": ErrorResponse, "description": "Body is not JSON."},
    422: {"model": ErrorResponse, "description": "Body is not valid for this model."},
    503: {"model": ErrorResponse, "description": "Model not loaded yet, or server busy."},
}


def _not_loaded() -> HTTPException:
    return HTTPException(503, "model not loaded", headers={"retry-after": "1"})


@router.post(
    "/predict",
    response_model=PredictionResponse,
    responses=_ERRORS,
    summary="Predict the class of one instance",
)
async def predict() -> PredictionResponse:
    raise _not_loaded()


@router.post(
    "/predict/batch",
    response_model=BatchPredictionResponse,
    responses=_ERRORS,
    summary="Predict the classes of 1 to MAX_BATCH_SIZE instances in one inference call",
)
async def predict_batch() -> BatchPredictionResponse:
    raise _not_loaded()
