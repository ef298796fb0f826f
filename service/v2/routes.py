"""The Open Inference Protocol (KServe V2) REST endpoints, as fast-path routes."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from service.capture.hook import capture_payload
from service.errors import NotFoundError
from service.fastpath import BodyTypes, FastRequest, FastResponse, FastRoute, is_json_content_type
from service.openapi import request_body, responses, schema_ref
from service.readiness import unready_reason
from service.schemas import example_value
from service.shadow.summary import shadow_summary
from service.v2.infer import HEADER_LENGTH, MATRIX_DTYPE, OCTET_STREAM, InferenceCodec
from service.v2.mapping import CategoryTensor, tensor_map
from service.v2.tensors import TensorError

if TYPE_CHECKING:
    from service.fastpath import Documenter, Handler
    from service.pipeline import PredictionPipeline

SERVER_NAME = "ml-api"
EXTENSIONS = ["binary_tensor_data"]
# "<project>_<format>", as the specification names platforms.
PLATFORMS = {"onnx": "onnx_onnxv1", "sklearn": "sklearn_joblib"}
TAGS = ("open inference protocol",)


@dataclass(frozen=True)
class ServedModel:
    """What V2 needs of the loaded bundle, built once per pipeline."""

    name: str
    version: str
    metadata: bytes
    codec: InferenceCodec


@functools.lru_cache(maxsize=2)
def served_model(pipeline: PredictionPipeline) -> ServedModel:
    manifest = pipeline.predictor.manifest
    tensors = tensor_map(manifest)
    metadata = {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": PLATFORMS.get(pipeline.predictor.backend.name, pipeline.predictor.backend.name),
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": t.shape, "parameters": t.metadata}
            for t in tensors.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in tensors.outputs
        ],
        "properties": tensors.properties,
    }
    codec = InferenceCodec(tensors, manifest.name, manifest.version, pipeline.max_batch_size)
    return ServedModel(manifest.name, manifest.version, orjson.dumps(metadata), codec)


def _model(request: FastRequest, pipeline: PredictionPipeline) -> ServedModel:
    """The model the URL names, if it is the one serving (and the version, if named)."""
    model = served_model(pipeline)
    name = request.params["model_name"]
    if name != model.name:
        raise NotFoundError(f"unknown model '{name}': this server serves '{model.name}'")
    version = request.params.get("model_version")
    if version is not None and version != model.version:
        raise NotFoundError(
            f"unknown version '{version}' of model '{name}': the version serving is "
            f"'{model.version}'"
        )
    return model


def _json(payload: dict[str, Any], status: int = 200) -> FastResponse:
    return FastResponse(orjson.dumps(payload), status)


async def server_metadata(request: FastRequest) -> FastResponse:
    return _json({"name": SERVER_NAME, "version": request.server_version, "extensions": EXTENSIONS})


async def server_live(request: FastRequest) -> FastResponse:
    return _json({"live": True})


async def server_ready(request: FastRequest) -> FastResponse:
    # The rule of /health/ready (whose answer says why): the protocol's body
    # has room for the verdict only.
    ready = unready_reason(request.state) is None
    return _json({"ready": ready}, 200 if ready else 503)


async def model_metadata(request: FastRequest) -> FastResponse:
    pipeline = request.require_pipeline()
    model = _model(request, pipeline)
    shadow = shadow_summary(pipeline)
    if shadow is None:
        return FastResponse(model.metadata)
    # The shadow's counts change with every request: never cached.
    return _json({**orjson.loads(model.metadata), "shadow": shadow})


async def model_ready(request: FastRequest) -> FastResponse:
    # Only the version serving is known here, and it is ready once loaded.
    return _json({"name": _model(request, request.require_pipeline()).name, "ready": True})


def _header_length(request: FastRequest) -> bytes | None:
    header_length = request.header(HEADER_LENGTH)
    if header_length is None and _is_octet_stream(request.header(b"content-type")):
        # Read as JSON it would fail on the first raw byte, naming neither.
        raise TensorError(
            "an application/octet-stream body needs the Inference-Header-Content-Length "
            "header: the length of the JSON part before the binary tensor data"
        )
    return header_length


async def infer(request: FastRequest) -> FastResponse:
    pipeline = request.require_pipeline()
    model = _model(request, pipeline)
    parsed = model.codec.decode(request.body, _header_length(request))
    # The usual request, one row of JSON numbers, is decoded as Python floats.
    if parsed.one_row is not None:
        outputs = await pipeline.run_row(parsed.one_row, MATRIX_DTYPE)
    else:
        outputs = await pipeline.run(parsed.rows)
    body, header_length = model.codec.encode(parsed, outputs)
    capture_payload(
        request, pipeline, parsed.rows if parsed.one_row is None else parsed.one_row, outputs
    )
    if header_length is None:
        return FastResponse(body)
    return FastResponse(
        body, content_type=OCTET_STREAM, headers=[(HEADER_LENGTH, b"%d" % header_length)]
    )


def _is_octet_stream(content_type: bytes | str | None) -> bool:
    if content_type is None:
        return False
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.split(";", 1)[0].strip().lower() == "application/octet-stream"


def _json_or_binary(content_type: str | None) -> bool:
    return is_json_content_type(content_type) or _is_octet_stream(content_type)


INFER_BODY = BodyTypes(
    _json_or_binary, "request body must be application/json or application/octet-stream"
)
_MODEL_ERRORS = {404: "Unknown model or version.", 503: "Model not loaded yet."}
_INFER_ERRORS = {
    400: "Invalid request: the message names the input, row and feature (or the missing "
    "Inference-Header-Content-Length), or a body that does not inflate.",
    404: "Unknown model or version.",
    413: "Body larger than MAX_REQUEST_BYTES, before or after inflating.",
    415: "Body is neither JSON nor the binary tensor extension's octet stream, or its "
    "Content-Encoding is not gzip or deflate.",
    503: "Model not loaded yet, or server busy.",
}
# The binary tensor extension's header, for a client to send with an octet-stream body.
HEADER_LENGTH_PARAMETER = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "With an application/octet-stream body: the length of its leading JSON "
    "part. Answers with binary outputs carry it too.",
    "schema": {"type": "integer", "minimum": 0},
}


def _v2_responses(
    components: dict[str, Any], ok: str, errors: dict[int, str], *, binary: bool = False
) -> dict[str, Any]:
    # The payload models only document: workers import them on the first
    # /openapi.json, not at every boot.
    from service.v2 import schemas

    bodies = {status: (text, schemas.V2Error) for status, text in errors.items()}
    return responses(components, getattr(schemas, ok), bodies, binary=binary)


def _documented(ok: str, errors: dict[int, str]) -> Documenter:
    def document(components: dict[str, Any], _: PredictionPipeline | None) -> dict[str, Any]:
        return {"responses": _v2_responses(components, ok, errors)}

    return document


def _document_infer(
    components: dict[str, Any], pipeline: PredictionPipeline | None
) -> dict[str, Any]:
    from service.v2 import schemas

    example = None
    if pipeline is not None:
        examples = {f.field_name: example_value(f) for f in pipeline.predictor.manifest.features}
        inputs = []
        for tensor in served_model(pipeline).codec.tensors.inputs:
            row = [examples[name] for name in tensor.feature_names]
            shape = [1] if isinstance(tensor, CategoryTensor) else [1, len(row)]
            inputs.append(
                {"name": tensor.name, "shape": shape, "datatype": tensor.datatype, "data": row}
            )
        example = {"id": "42", "inputs": inputs}
    return {
        "parameters": [HEADER_LENGTH_PARAMETER],
        "requestBody": request_body(
            schema_ref(schemas.InferenceRequest, components), example=example, binary=True
        ),
        "responses": _v2_responses(components, "InferenceResponse", _INFER_ERRORS, binary=True),
    }


_BINARY = (
    "With the binary tensor data extension the body is the JSON request followed by "
    "the inputs' raw little-endian bytes; the header Inference-Header-Content-Length "
    "gives the JSON part's length. Binary outputs come back the same way."
)
_MODEL = "/v2/models/{model_name}"
_VERSION = _MODEL + "/versions/{model_version}"


def _get(
    path: str,
    handler: Handler,
    summary: str,
    operation_id: str,
    ok: str,
    errors: dict[int, str],
    *,
    public: bool = False,
) -> FastRoute:
    return FastRoute(
        "GET",
        path,
        handler,
        summary=summary,
        tags=TAGS,
        document=_documented(ok, errors),
        operation_id=operation_id,
        public=public,
    )


def _infer(path: str, summary: str, operation_id: str) -> FastRoute:
    return FastRoute(
        "POST",
        path,
        infer,
        summary=summary,
        tags=TAGS,
        document=_document_infer,
        operation_id=operation_id,
        accepts=INFER_BODY,
        description=_BINARY,
    )


# Liveness and readiness are public: probes and load balancers carry no key.
# Metadata is not: it describes the model.
ROUTES = (
    _get("/v2", server_metadata, "Server metadata", "v2_server_metadata", "ServerMetadata", {}),
    _get(
        "/v2/health/live",
        server_live,
        "Server live",
        "v2_server_live",
        "ServerLive",
        {},
        public=True,
    ),
    _get(
        "/v2/health/ready",
        server_ready,
        "Server ready",
        "v2_server_ready",
        "ServerReady",
        {
            503: "Model not loaded yet, or the API keys copy is no longer kept current "
            "(`API_KEYS_URL`): /health/ready says which."
        },
        public=True,
    ),
    _get(
        _MODEL,
        model_metadata,
        "Model metadata",
        "v2_model_metadata",
        "ModelMetadata",
        _MODEL_ERRORS,
    ),
    _get(
        _MODEL + "/ready",
        model_ready,
        "Model ready",
        "v2_model_ready",
        "ModelReady",
        _MODEL_ERRORS,
        public=True,
    ),
    _get(
        _VERSION,
        model_metadata,
        "Model version metadata",
        "v2_model_version_metadata",
        "ModelMetadata",
        _MODEL_ERRORS,
    ),
    _get(
        _VERSION + "/ready",
        model_ready,
        "Model version ready",
        "v2_model_version_ready",
        "ModelReady",
        _MODEL_ERRORS,
        public=True,
    ),
    _infer(_MODEL + "/infer", "Inference", "v2_infer"),
    _infer(_VERSION + "/infer", "Inference on a named version", "v2_infer_version"),
)
