"""The Open Inference Protocol payloads, for the OpenAPI document.

Requests are not parsed through these models (the tensor data would cost
per-element validation in Python); service.v2.infer reads them directly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from service.shadow.summary import ShadowSummary

Parameters = dict[str, str | int | float | bool]


class V2Error(BaseModel):
    error: str = Field(description="What is wrong, naming the input, row and feature.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="'binary_tensor_data': the binary extension.")


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch dimension.")


class InputParameters(BaseModel):
    feature_names: list[str] = Field(description="The features this input carries, in order.")
    nullable: list[bool] = Field(
        description="Per feature: a missing value is accepted (JSON null; NaN in binary data)."
    )
    categories: list[str] | None = Field(
        default=None, description="A category input's allowed values."
    )


class InputMetadata(TensorMetadata):
    parameters: InputParameters


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="Only the version serving can be requested.")
    platform: str
    inputs: list[InputMetadata]
    outputs: list[TensorMetadata]
    properties: dict[str, Any] = Field(
        description=(
            "task, feature_names (the manifest's feature order, an array), classes (an "
            "array), and categories (each category input's allowed values)."
        )
    )
    shadow: ShadowSummary | None = Field(
        default=None,
        description="Present while a candidate is scored in this version's shadow: which, "
        "its state and its agreement so far.",
    )


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str = Field(
        description=(
            "features: FP32, FP64 or an integer type (INT8..INT64, UINT8..UINT64); "
            "a category input: BYTES."
        )
    )
    parameters: Parameters | None = Field(
        default=None,
        description="binary_data_size: this input's bytes follow the JSON (binary extension).",
    )
    # Absent rather than null (the server refuses null data): SkipJsonSchema
    # keeps None out of the document.
    data: list[Any] | SkipJsonSchema[None] = Field(
        default=None, description="Row-major elements, flat or nested as the shape."
    )


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(
        default=None, description="binary_data: send this output as binary data."
    )


class InferenceRequest(BaseModel):
    id: str | None = Field(default=None, description="Echoed in the response.")
    parameters: Parameters | None = Field(
        default=None, description="binary_data_output: send every output as binary data."
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(
        default=None, description="Which outputs to return; all when absent."
    )


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | SkipJsonSchema[None] = None


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]
