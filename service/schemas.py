"""Request models built from the manifest, and the fixed response models.

The request models are generated per bundle so that any data set gets a
correctly typed API: one strict float field per feature, with the feature's
description, unit and bounds in the OpenAPI schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from service.manifest import FeatureSpec, Manifest

FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Prediction(_Response):
    predicted_class: int = Field(description="Index of the predicted class in the model's classes.")
    predicted_class_name: str
    confidence: float = Field(ge=0, le=1, description="Probability of the predicted class.")
    probabilities: dict[str, float] = Field(description="Class name → probability.")


class PredictionResponse(Prediction):
    model_version: str


class BatchPredictionResponse(_Response):
    predictions: list[Prediction]
    model_version: str


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is: body, then keys and indexes.")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: str | list[ErrorItem]
    request_id: str | None = None


def _example_value(feature: FeatureSpec) -> float:
    value = round(feature.training_mean, 2)
    return min(max(value, feature.training_min), feature.training_max)


def feature_field(feature: FeatureSpec) -> Any:
    """A strict float: booleans, strings, NaN and infinities are rejected, and so
    are values outside the feature's bounds or outside float32 range (the
    model computes in float32, where they would silently become inf)."""
    maximum = feature.maximum if feature.maximum is not None else FLOAT32_MAX
    minimum = feature.minimum if feature.minimum is not None else -FLOAT32_MAX
    description = feature.description + (f" Unit: {feature.unit}." if feature.unit else "")
    extra: dict[str, Any] = {"examples": [_example_value(feature)]}
    if feature.unit:
        extra["x-unit"] = feature.unit
    return Annotated[
        float,
        Field(
            strict=True,
            allow_inf_nan=False,
            description=description,
            gt=feature.exclusive_minimum,
            ge=None if feature.exclusive_minimum is not None else max(minimum, -FLOAT32_MAX),
            lt=feature.exclusive_maximum,
            le=None if feature.exclusive_maximum is not None else min(maximum, FLOAT32_MAX),
            json_schema_extra=extra,
        ),
    ]


def _title(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))


@dataclass(frozen=True)
class RequestModels:
    instance: type[BaseModel]
    batch: type[BaseModel]
    example: dict[str, float]


def build_request_models(manifest: Manifest, max_batch_size: int) -> RequestModels:
    example = {f.name: _example_value(f) for f in manifest.features}
    example_json: dict[str, Any] = dict(example)
    strict_object = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra={"examples": [example_json]}
    )
    fields: dict[str, Any] = {f.name: (feature_field(f), ...) for f in manifest.features}
    prefix = _title(manifest.name)
    instance = create_model(f"{prefix}Instance", __config__=strict_object, **fields)
    batch = create_model(
        f"{prefix}BatchRequest",
        __config__=ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"instances": [example_json]}]}
        ),
        instances=(list[instance], Field(min_length=1, max_length=max_batch_size)),
    )
    return RequestModels(instance=instance, batch=batch, example=example)
