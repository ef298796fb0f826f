"""The bundle manifest: the one contract between training and serving.

This pydantic model is the single definition of `manifest.json`: training
builds a manifest by validating it with this model (the only thing training
imports from the service; this module depends on pydantic and the standard
library alone), and the service validates it again on load. `make schema`
exports it as `training/manifest.schema.json`, the published contract for
other readers and writers; a unit test keeps the two in sync.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# 3: features may be nullable (with their reference missing rate), have any
# name a DataFrame column can have, an API name of their own, and bounds only
# where declared. Schema 2 manifests validate unchanged; schema 1 is upgraded.
SCHEMA_VERSION: Literal[3] = 3
MODEL_FILE_SKLEARN = "model.joblib"
# The native model as skops wrote it: loaded by skops' safe loader, never unpickled.
MODEL_FILE_SKOPS = "model.skops"
MODEL_FILE_ONNX = "model.onnx"
MANIFEST_FILE = "manifest.json"

SEMVER_PATTERN = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
# ASCII: a Unicode digit would pass `[0-9]`-free engines' `\d` and surprise everyone.
SEMVER_RE = re.compile(SEMVER_PATTERN, re.ASCII)
# Names become URL segments, Prometheus label values and Python identifiers.
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN, re.ASCII)
# A feature's name is the model's own column name and, as-is, its JSON field
# name and metric label: any text a DataFrame column can hold but control
# characters (they break logs, headers and the exposition format).
MAX_FEATURE_NAME_LENGTH = 200
FEATURE_NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{1,200}$"
FEATURE_NAME_RE = re.compile(FEATURE_NAME_PATTERN)
# What an ONNX graph's string input is given for a missing category (the
# packager's conversions impute this string; the parity gate measured it).
ONNX_MISSING_CATEGORY = ""
# A bundle file name is joined to the bundle path: no separators, no dot-files.
FILE_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# A category value is a JSON string in requests and a label value in metrics.
MAX_CATEGORIES = 1000
MAX_CATEGORY_LENGTH = 200
# What an ONNX graph's string input receives for a missing category: never a
# category itself (categories are non-empty), and what the packager's graph
# maps to the fitted imputer's fill value.
ONNX_MISSING_CATEGORY = ""
# Class names are label values, answer fields and log text too: bounded alike.
MAX_CLASSES = 1000
DECILE_COUNT = 9

Backend = Literal["onnx", "sklearn"]
Task = Literal["classification", "regression"]
FeatureKind = Literal["number", "integer", "category"]


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN is not JSON, and no statistic may be non-finite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_deciles(what: str, deciles: list[float] | None) -> None:
    if deciles is not None and deciles != sorted(deciles):
        raise ValueError(f"{what}: deciles must be non-decreasing")


def bin_edges(deciles: list[float]) -> tuple[float, ...]:
    """The live histogram's bucket edges: the distinct deciles (tied deciles, as
    in integer or rounded data, make one edge)."""
    return tuple(sorted(set(deciles)))


def _check_shares(what: str, shares: list[float] | None, bins: int) -> None:
    if shares is None:
        return
    if len(shares) != bins:
        raise ValueError(f"{what}: {bins} bin shares expected, one per bin, got {len(shares)}")
    if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"{what}: bin shares must sum to 1")


# Reference shares per bin: the share of reference rows the live histogram
# would count in each bucket, (-inf, e0], (e0, e1], ..., (e_last, +inf) over
# bin_edges(deciles); drift scores compare live shares against them.
BinShares = list[Annotated[float, Field(ge=0, le=1)]]


class _FeatureBase(_Strict):
    name: str = Field(pattern=FEATURE_NAME_PATTERN, description="The model's own column name.")
    description: str
    unit: str | None = None
    api_name: str | None = Field(
        default=None,
        pattern=FEATURE_NAME_PATTERN,
        description="The JSON field name, when renamed (--rename); else `name`.",
    )
    nullable: bool = Field(
        default=False,
        description="Accepts a missing value (JSON null or a left-out field): the model "
        "sees NaN, or a missing category.",
    )
    missing_rate: float | None = Field(
        default=None, ge=0, le=1, description="Share of reference rows missing this feature."
    )

    @property
    def field_name(self) -> str:
        """The feature's name in requests, answers' metadata and the OpenAPI document."""
        return self.api_name or self.name


class _NumericFeature(_FeatureBase):
    # Requests outside these bounds are rejected: far outside the training
    # range a value is almost always a unit or encoding mistake.
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    exclusive_maximum: float | None = None
    # Statistics of the training (or reference) data; all absent when a model
    # was packaged without reference data, which turns its drift metrics off.
    training_min: float | None = None
    training_max: float | None = None
    training_mean: float | None = None
    # Nine decile edges: bucket edges for the live input histograms, so
    # dashboards compare live inputs with the reference data.
    deciles: list[float] | None = Field(
        default=None, min_length=DECILE_COUNT, max_length=DECILE_COUNT
    )
    # Absent in bundles built before drift scores; those features get no score.
    bin_shares: BinShares | None = None
    # True when the bounds above were declared (--bounds, a data set's physical
    # limits) rather than derived from the reference data.
    bounds_declared: bool = False

    @property
    def has_reference(self) -> bool:
        return self.deciles is not None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        stats = (self.training_min, self.training_max, self.training_mean, self.deciles)
        if any(s is None for s in stats) and any(s is not None for s in stats):
            raise ValueError(
                f"feature {self.name!r}: training_min, training_max, training_mean and "
                "deciles come together"
            )
        _check_deciles(f"feature {self.name!r}", self.deciles)
        if self.bin_shares is not None:
            if self.deciles is None:
                raise ValueError(f"feature {self.name!r}: bin_shares need deciles")
            _check_shares(
                f"feature {self.name!r}", self.bin_shares, len(bin_edges(self.deciles)) + 1
            )
        if (
            self.training_min is not None
            and self.training_max is not None
            and self.training_min > self.training_max
        ):
            raise ValueError(f"feature {self.name!r}: training_min exceeds training_max")
        if self.minimum is not None and self.exclusive_minimum is not None:
            raise ValueError(f"feature {self.name!r}: set minimum or exclusive_minimum, not both")
        if self.maximum is not None and self.exclusive_maximum is not None:
            raise ValueError(f"feature {self.name!r}: set maximum or exclusive_maximum, not both")
        return self


class NumberFeature(_NumericFeature):
    kind: Literal["number"] = "number"


class IntegerFeature(_NumericFeature):
    """A whole number: requests must send a JSON integer (not 1.5, not a boolean)."""

    kind: Literal["integer"] = "integer"

    @model_validator(mode="after")
    def _whole_bounds(self) -> Self:
        for bound in (self.minimum, self.exclusive_minimum, self.maximum, self.exclusive_maximum):
            if bound is not None and not float(bound).is_integer():
                raise ValueError(f"feature {self.name!r}: integer bounds must be whole numbers")
        return self


class CategoryFeature(_FeatureBase):
    """A string from a closed set; anything else is rejected with a 422."""

    kind: Literal["category"] = "category"
    categories: list[Annotated[str, Field(min_length=1, max_length=MAX_CATEGORY_LENGTH)]] = Field(
        min_length=1, max_length=MAX_CATEGORIES
    )
    # Share of each category in the reference data, in `categories` order;
    # absent without reference data.
    frequencies: list[Annotated[float, Field(ge=0, le=1)]] | None = None
    # How the native model takes the column: strings ("object"), or a pandas
    # `category` dtype over `categories` (LightGBM, XGBoost enable_categorical,
    # HistGradientBoosting categorical_features="from_dtype").
    native_dtype: Literal["object", "category"] = "object"

    @property
    def has_reference(self) -> bool:
        return self.frequencies is not None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"feature {self.name!r}: categories must be unique")
        if self.frequencies is not None:
            if len(self.frequencies) != len(self.categories):
                raise ValueError(
                    f"feature {self.name!r}: one frequency per category, in the same order"
                )
            if not math.isclose(sum(self.frequencies), 1.0, abs_tol=1e-6):
                raise ValueError(f"feature {self.name!r}: frequencies must sum to 1")
        return self


FeatureSpec = Annotated[
    NumberFeature | IntegerFeature | CategoryFeature, Field(discriminator="kind")
]


class TargetStatistics(_Strict):
    """What a regressor's target looked like: bucket edges of the live prediction histogram."""

    minimum: float
    maximum: float
    mean: float
    deciles: list[float] = Field(min_length=DECILE_COUNT, max_length=DECILE_COUNT)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_deciles("target", self.deciles)
        if self.minimum > self.maximum:
            raise ValueError("target: minimum exceeds maximum")
        return self


class DatasetInfo(_Strict):
    source: str
    target: str | None = None
    n_rows: int = Field(ge=1)


class LibraryVersions(_Strict):
    python: str
    numpy: str
    scikit_learn: str
    joblib: str
    skl2onnx: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    onnxmltools: str | None = None
    xgboost: str | None = None
    lightgbm: str | None = None
    skops: str | None = None


class EstimatorInfo(_Strict):
    class_name: str
    module: str
    params: dict[str, Any]


class EvaluationMetrics(_Strict):
    """Scores on held-out rows (fitting) or on the reference data (packaging)."""

    evaluated_on: Literal["held_out", "reference"]
    n_rows: int = Field(ge=1, description="Rows scored.")
    n_train: int | None = Field(default=None, ge=1)
    test_size: float | None = Field(default=None, gt=0, lt=1)
    accuracy: float | None = Field(default=None, ge=0, le=1)
    f1_macro: float | None = Field(default=None, ge=0, le=1)
    r2: float | None = Field(default=None, le=1)
    mean_absolute_error: float | None = Field(default=None, ge=0)
    root_mean_squared_error: float | None = Field(default=None, ge=0)


class ParityReport(_Strict):
    passed: bool
    test_rows: int = Field(ge=0, description="Rows of real data compared.")
    random_rows: int = Field(ge=0, description="Rows drawn at random inside the feature bounds.")
    class_mismatches: int = Field(ge=0)
    compared: Literal["probabilities", "predictions"]
    max_abs_diff: float | None = None
    # Regression only: |onnx - sklearn| / max(1, |sklearn|), what the tolerance bounds.
    max_rel_diff: float | None = None
    tolerance: float = Field(
        ge=0,
        description="Bound on the absolute probability difference (classification) or on "
        "the relative prediction difference |onnx - sklearn| / max(1, |sklearn|) (regression).",
    )
    reason: str | None = None


class OnnxInfo(_Strict):
    opset: int = Field(ge=1)
    # Either one float32 [N, n_features] input (a pandas `category` feature
    # as its code, NaN when missing), or one [N, 1] input per feature in
    # feature order (float32, or string for a category).
    input_name: str | None = None
    column_inputs: list[str] | None = None
    label_output: str | None = None
    probabilities_output: str | None = None
    prediction_output: str | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> Self:
        if (self.input_name is None) == (self.column_inputs is None):
            raise ValueError("onnx: set exactly one of input_name and column_inputs")
        return self


class FileEntry(_Strict):
    sha256: str = Field(pattern=SHA256_PATTERN)
    size_bytes: int = Field(ge=0)


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 manifest (ml-api before user models: numeric features, a
    classifier) in today's terms, so bundles built then keep serving."""
    upgraded = {**data, "schema_version": SCHEMA_VERSION, "task": "classification"}
    upgraded["features"] = [
        {**f, "kind": "number"} if isinstance(f, dict) else f for f in data.get("features", [])
    ]
    metrics = data.get("metrics")
    if isinstance(metrics, dict) and "n_test" in metrics:
        rest = {k: v for k, v in metrics.items() if k != "n_test"}
        upgraded["metrics"] = {"evaluated_on": "held_out", "n_rows": metrics["n_test"], **rest}
    parity = data.get("parity")
    if isinstance(parity, dict) and "max_abs_probability_diff" in parity:
        rest = {k: v for k, v in parity.items() if k != "max_abs_probability_diff"}
        upgraded["parity"] = {
            **rest,
            "compared": "probabilities",
            "max_abs_diff": parity["max_abs_probability_diff"],
        }
    return upgraded


class Manifest(_Strict):
    schema_version: Literal[2, 3] = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    created_at: datetime
    task: Task
    dataset: DatasetInfo | None = Field(
        description="The training or reference data; absent when packaged without any."
    )
    libraries: LibraryVersions
    estimator: EstimatorInfo
    features: list[FeatureSpec] = Field(min_length=1, max_length=4096)
    classes: list[Annotated[str, Field(min_length=1, max_length=MAX_CATEGORY_LENGTH)]] | None = (
        Field(
            default=None,
            min_length=2,
            max_length=MAX_CLASSES,
            description="Class names in output order (classification).",
        )
    )
    target_statistics: TargetStatistics | None = Field(
        default=None, description="The reference target's statistics (regression)."
    )
    prediction_shares: BinShares | None = Field(
        default=None,
        description="Share of the model's predictions on the reference rows per class "
        "(classification, in `classes` order) or per bin of the target deciles as the live "
        "prediction histogram buckets them (regression); the baseline of prediction drift.",
    )
    metrics: EvaluationMetrics | None = None
    parity: ParityReport
    onnx: OnnxInfo | None = None
    backend: Backend = Field(
        description="The backend this bundle supports best; 'sklearn' means no usable ONNX model."
    )
    files: dict[Annotated[str, Field(pattern=FILE_NAME_PATTERN)], FileEntry]
    skops_trusted_types: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None,
        max_length=1000,
        description="Set when the native model is model.skops (instead of model.joblib): "
        "the types beyond skops' defaults its loader trusts, as the packager's user confirmed.",
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_schema_1(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("schema_version") == 1:
            return _upgrade_v1(data)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = self.feature_names
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        fields = self.field_names
        if len(set(fields)) != len(fields):
            raise ValueError("feature API names must be unique")
        self._check_task()
        if self.native_model_file not in self.files:
            raise ValueError(f"files must list {self.native_model_file}")
        has_onnx = MODEL_FILE_ONNX in self.files
        if self.backend == "onnx" and not (has_onnx and self.onnx and self.parity.passed):
            raise ValueError(
                "backend 'onnx' needs model.onnx, its onnx section and a passed parity gate"
            )
        if has_onnx != (self.onnx is not None):
            raise ValueError("model.onnx and the onnx section come together")
        if self.onnx is not None:
            self._check_onnx(self.onnx)
        return self

    def _check_task(self) -> None:
        if self.task == "classification":
            if self.classes is None:
                raise ValueError("a classification bundle lists its classes")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("class names must be unique")
            if self.target_statistics is not None:
                raise ValueError("target_statistics describe a regression target")
            if self.parity.compared != "probabilities":
                raise ValueError("classification parity compares probabilities")
            scores: tuple[float | None, ...] = ()
            if self.metrics is not None:
                scores = (self.metrics.accuracy, self.metrics.f1_macro)
        else:
            if self.classes is not None:
                raise ValueError("a regression bundle has no classes")
            if self.parity.compared != "predictions":
                raise ValueError("regression parity compares predictions")
            if self.metrics is not None:
                scores = (
                    self.metrics.r2,
                    self.metrics.mean_absolute_error,
                    self.metrics.root_mean_squared_error,
                )
            else:
                scores = ()
        if any(score is None for score in scores):
            raise ValueError(f"metrics lack the scores of a {self.task} model")
        if self.prediction_shares is not None:
            if self.classes is not None:
                bins = len(self.classes)
            elif self.target_statistics is not None:
                bins = len(bin_edges(self.target_statistics.deciles)) + 1
            else:
                raise ValueError("prediction_shares need target_statistics (regression)")
            _check_shares("prediction", self.prediction_shares, bins)

    def _check_onnx(self, onnx: OnnxInfo) -> None:
        if onnx.column_inputs is not None and len(onnx.column_inputs) != len(self.features):
            raise ValueError("onnx.column_inputs needs one input per feature")
        # A float matrix holds a category as its code, which only a graph
        # converted from pandas `category` codes (LightGBM) reads as the model does.
        as_strings = [
            f.name
            for f in self.features
            if isinstance(f, CategoryFeature) and f.native_dtype != "category"
        ]
        if onnx.input_name is not None and as_strings:
            raise ValueError(
                "a category feature needs onnx.column_inputs unless its native_dtype is category"
            )
        output = onnx.probabilities_output if self.task == "classification" else None
        output = output or (onnx.prediction_output if self.task == "regression" else None)
        if output is None:
            needed = (
                "probabilities_output" if self.task == "classification" else "prediction_output"
            )
            raise ValueError(f"a {self.task} ONNX model needs onnx.{needed}")

    @property
    def native_model_file(self) -> str:
        return MODEL_FILE_SKLEARN if self.skops_trusted_types is None else MODEL_FILE_SKOPS

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def field_names(self) -> list[str]:
        return [f.field_name for f in self.features]

    @property
    def has_reference_data(self) -> bool:
        """Drift metrics need reference statistics for every feature."""
        return all(f.has_reference for f in self.features)


def json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema(mode="validation")
    # pydantic renders keyed-dict patterns as patternProperties, which alone
    # would still admit other keys (such as "../x").
    schema["properties"]["files"]["additionalProperties"] = False
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$comment"] = "Generated from service/manifest.py by `make schema`; do not edit."
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(json_schema_text(), end="")
