"""POST /predict and /predict/batch: ml-api's own prediction API, on the fast path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.capture.hook import capture_payload
from service.fastpath import JSON_BODY, Documenter, FastRequest, FastResponse, FastRoute
from service.openapi import Errors, request_body, responses, schema_ref
from service.predict_codec import predict_codec
from service.schemas import (
    BatchPredictionResponse,
    ErrorResponse,
    PredictionResponse,
    ValidationErrorResponse,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from service.pipeline import PredictionPipeline, RowOutputs

_ERRORS: Errors = {
    400: ("Body does not inflate as its Content-Encoding says.", ErrorResponse),
    413: ("Body larger than MAX_REQUEST_BYTES, before or after inflating.", ErrorResponse),
    415: ("Body is not JSON, or its Content-Encoding is not gzip or deflate.", ErrorResponse),
    422: ("Body is not valid for this model.", ValidationErrorResponse),
    503: ("Model not loaded yet, or server busy.", ErrorResponse),
}


async def predict(request: FastRequest) -> FastResponse:
    pipeline = request.require_pipeline()
    codec = predict_codec(pipeline)
    row = codec.decode_one(request.body)
    # The usual single row needs no await; the one-row matrix takes every other.
    outputs: RowOutputs | None = pipeline.run_row_inline(row)
    if outputs is None:
        outputs = await pipeline.run_row_matrix(row)
    answer = FastResponse(codec.encode_one(outputs))
    capture_payload(request, pipeline, row, outputs)
    return answer


async def predict_batch(request: FastRequest) -> FastResponse:
    pipeline = request.require_pipeline()
    codec = predict_codec(pipeline)
    rows = codec.decode_batch(request.body)
    outputs = await pipeline.run(rows)
    answer = FastResponse(codec.encode_batch(outputs))
    capture_payload(request, pipeline, rows, outputs)
    return answer


def _documenter(request_model: str, response_model: str, unloaded: type[BaseModel]) -> Documenter:
    def document(components: dict[str, Any], pipeline: PredictionPipeline | None) -> dict[str, Any]:
        if pipeline is None:
            return {"responses": responses(components, unloaded, _ERRORS)}
        # Request and answer schemas are the bundle's (its features; a
        # classifier's or a regressor's answer): known once it is loaded.
        models = predict_codec(pipeline).models
        ok = getattr(models, response_model)
        model = getattr(models, request_model)
        return {
            "responses": responses(components, ok, _ERRORS),
            "requestBody": request_body(schema_ref(model, components)),
        }

    return document


ROUTES = (
    FastRoute(
        "POST",
        "/predict",
        predict,
        summary="Predict one instance: its class (classifier) or value (regressor)",
        tags=("predict",),
        document=_documenter("instance", "response", PredictionResponse),
        operation_id="predict",
        accepts=JSON_BODY,
    ),
    FastRoute(
        "POST",
        "/predict/batch",
        predict_batch,
        summary="Predict 1 to MAX_BATCH_SIZE instances in one inference call",
        tags=("predict",),
        document=_documenter("batch", "batch_response", BatchPredictionResponse),
        operation_id="predict_batch",
        accepts=JSON_BODY,
    ),
)
