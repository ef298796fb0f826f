"""Request models built from the manifest, and the fixed response models.

The request models are generated per bundle so that any model gets a
correctly typed API: one strict field per feature (a float, an integer, or a
string from a closed set), with the feature's description, unit, bounds or
allowed values in the OpenAPI schema.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, create_model

from service.manifest import CategoryFeature, FeatureSpec, IntegerFeature, Manifest

FLOAT32_MAX = float(np.finfo(np.float32).max)
# An ONNX model takes float32, which holds every integer exactly up to 2**24.
INTEGER_LIMIT = 2**24


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ClassProbabilities(RootModel[dict[str, float]]):
    """Class name → probability."""


class Prediction(_Response):
    predicted_class: int = Field(description="Index of the predicted class in the model's classes.")
    predicted_class_name: str
    confidence: float = Field(ge=0, le=1, description="Probability of the predicted class.")
    probabilities: ClassProbabilities


class PredictionResponse(Prediction):
    model_version: str


class BatchPredictionResponse(_Response):
    predictions: list[Prediction]
    model_version: str


class RegressionPrediction(_Response):
    prediction: float = Field(description="The model's predicted value.")


class RegressionPredictionResponse(RegressionPrediction):
    model_version: str


class RegressionBatchPredictionResponse(_Response):
    predictions: list[RegressionPrediction]
    model_version: str


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is: body, then keys and indexes.")
    msg: str
    type: str
    ctx: dict[str, int] | None = Field(
        default=None,
        description="too_many_errors: error_count (all of them) and listed (how many are).",
    )


class ErrorResponse(BaseModel):
    """ml-api's error body, for every status but 422."""

    detail: str
    request_id: str | None = None


class ValidationErrorResponse(BaseModel):
    """A body that is not valid for the model (422): one entry per problem."""

    detail: list[ErrorItem]
    request_id: str | None = None


def example_value(feature: FeatureSpec) -> float | int | str:
    """A value from the reference data: its mean, or its most frequent category."""
    if isinstance(feature, CategoryFeature):
        return feature.categories[0]
    lower = feature.exclusive_minimum if feature.exclusive_minimum is not None else feature.minimum
    if feature.training_mean is None or feature.training_min is None:
        value = 0.0 if lower is None or lower < 0 else lower + 1
    else:
        assert feature.training_max is not None
        value = min(
            max(round(feature.training_mean, 2), feature.training_min), feature.training_max
        )
    return round(value) if isinstance(feature, IntegerFeature) else value


def _description(feature: FeatureSpec) -> str:
    return feature.description + (f" Unit: {feature.unit}." if feature.unit else "")


def category_field(feature: CategoryFeature) -> Any:
    """One of the allowed strings; validation also turns it into its index, the
    form the backends and metrics take."""
    codes = {value: float(i) for i, value in enumerate(feature.categories)}
    allowed = Literal[tuple(feature.categories)]  # type: ignore[valid-type]
    return Annotated[
        allowed,
        AfterValidator(codes.__getitem__),
        # A literal matches exact strings only: no `strict` needed (nor accepted).
        Field(
            description=_description(feature),
            json_schema_extra={"examples": [example_value(feature)]},
        ),
    ]


def feature_field(feature: FeatureSpec) -> Any:
    """A strict number: booleans, strings, NaN and infinities are rejected, and so
    are values outside the feature's bounds or outside float32 range (the
    model computes in float32, where they would silently become inf). An
    integer feature also rejects fractions."""
    if isinstance(feature, CategoryFeature):
        return category_field(feature)
    integer = isinstance(feature, IntegerFeature)
    limit = float(INTEGER_LIMIT) if integer else FLOAT32_MAX
    maximum = feature.maximum if feature.maximum is not None else limit
    minimum = feature.minimum if feature.minimum is not None else -limit
    extra: dict[str, Any] = {"examples": [example_value(feature)]}
    if feature.unit:
        extra["x-unit"] = feature.unit

    def bound(value: float | None) -> float | int | None:
        if value is None:
            return None
        return int(value) if integer else value

    return Annotated[
        int if integer else float,
        Field(
            strict=True,
            allow_inf_nan=False,
            description=_description(feature),
            gt=bound(feature.exclusive_minimum),
            ge=None if feature.exclusive_minimum is not None else bound(max(minimum, -limit)),
            lt=bound(feature.exclusive_maximum),
            le=None if feature.exclusive_maximum is not None else bound(min(maximum, limit)),
            json_schema_extra=extra,
        ),
    ]


def nullable_field(feature: FeatureSpec) -> Any:
    """The feature's field, or null; a left-out field is null too (the default)."""
    value = feature_field(feature)
    return Annotated[
        value | None,
        Field(description=_description(feature), json_schema_extra={"x-nullable": True}),
    ]


def _attribute(feature: FeatureSpec, position: int) -> tuple[str, dict[str, Any]]:
    """The model field's attribute name and its alias: the field name itself where it
    is a plain identifier (the OpenAPI document stays as it was), else a positional
    attribute with the name as the alias clients send."""
    name = feature.field_name
    plain = name.isidentifier() and not keyword.iskeyword(name)
    # pydantic reserves leading underscores and warns about its `model_` namespace.
    if plain and not name.startswith(("_", "model_")) and not hasattr(BaseModel, name):
        return name, {}
    return f"feature_{position}", {"alias": name, "title": name}


def row_attributes(manifest: Manifest) -> list[str]:
    """Attribute names of the instance model's fields, in feature order."""
    return [_attribute(f, j)[0] for j, f in enumerate(manifest.features)]


def _field(feature: FeatureSpec, position: int) -> tuple[str, Any]:
    attribute, alias = _attribute(feature, position)
    if feature.nullable:
        return attribute, (nullable_field(feature), Field(None, **alias))
    return attribute, (feature_field(feature), Field(..., **alias))


def _title(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))


@dataclass(frozen=True)
class RequestModels:
    instance: type[BaseModel]
    batch: type[BaseModel]
    example: dict[str, float | int | str]
    response: type[BaseModel]
    batch_response: type[BaseModel]


def build_request_models(manifest: Manifest, max_batch_size: int) -> RequestModels:
    example = {f.field_name: example_value(f) for f in manifest.features}
    example_json: dict[str, Any] = dict(example)
    strict_object = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra={"examples": [example_json]}
    )
    fields: dict[str, Any] = dict(_field(f, j) for j, f in enumerate(manifest.features))
    prefix = _title(manifest.name)
    instance = create_model(f"{prefix}Instance", __config__=strict_object, **fields)
    batch = create_model(
        f"{prefix}BatchRequest",
        __config__=ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"instances": [example_json]}]}
        ),
        instances=(list[instance], Field(min_length=1, max_length=max_batch_size)),
    )
    regression = manifest.task == "regression"
    return RequestModels(
        instance=instance,
        batch=batch,
        example=example,
        response=RegressionPredictionResponse if regression else PredictionResponse,
        batch_response=(
            RegressionBatchPredictionResponse if regression else BatchPredictionResponse
        ),
    )
