"""The bundle manifest: the one contract between training and serving.

This pydantic model is the single definition of `manifest.json`. Training never
imports the service, so `make schema` exports this model as
`training/manifest.schema.json`, which training validates every manifest against
before it writes a bundle; a unit test keeps the two in sync.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
MODEL_FILE_SKLEARN = "model.joblib"
MODEL_FILE_ONNX = "model.onnx"
MANIFEST_FILE = "manifest.json"

SEMVER_PATTERN = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
SEMVER_RE = re.compile(SEMVER_PATTERN)
# Names become URL segments, Prometheus label values and Python identifiers.
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
FEATURE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
# A bundle file name is joined to the bundle path: no separators, no dot-files.
FILE_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

Backend = Literal["onnx", "sklearn"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(_Strict):
    name: str = Field(pattern=FEATURE_NAME_PATTERN)
    description: str
    unit: str | None = None
    # Requests outside these bounds are rejected: far outside the training
    # range a value is almost always a unit or encoding mistake.
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    exclusive_maximum: float | None = None
    training_min: float
    training_max: float
    training_mean: float
    # Nine decile edges of the training data: bucket edges for the live
    # input histograms, so dashboards compare live inputs with training.
    deciles: list[float] = Field(min_length=9, max_length=9)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.deciles != sorted(self.deciles):
            raise ValueError(f"feature {self.name!r}: deciles must be non-decreasing")
        if self.training_min > self.training_max:
            raise ValueError(f"feature {self.name!r}: training_min exceeds training_max")
        if self.minimum is not None and self.exclusive_minimum is not None:
            raise ValueError(f"feature {self.name!r}: set minimum or exclusive_minimum, not both")
        if self.maximum is not None and self.exclusive_maximum is not None:
            raise ValueError(f"feature {self.name!r}: set maximum or exclusive_maximum, not both")
        return self


class DatasetInfo(_Strict):
    source: str
    target: str
    n_rows: int = Field(ge=1)


class LibraryVersions(_Strict):
    python: str
    numpy: str
    scikit_learn: str
    joblib: str
    skl2onnx: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None


class EstimatorInfo(_Strict):
    class_name: str
    module: str
    params: dict[str, Any]


class EvaluationMetrics(_Strict):
    accuracy: float = Field(ge=0, le=1)
    f1_macro: float = Field(ge=0, le=1)
    n_train: int = Field(ge=1)
    n_test: int = Field(ge=1)
    test_size: float = Field(gt=0, lt=1)


class ParityReport(_Strict):
    passed: bool
    test_rows: int = Field(ge=0)
    random_rows: int = Field(ge=0)
    class_mismatches: int = Field(ge=0)
    max_abs_probability_diff: float | None = None
    tolerance: float
    reason: str | None = None


class OnnxInfo(_Strict):
    opset: int = Field(ge=1)
    input_name: str
    label_output: str
    probabilities_output: str


class FileEntry(_Strict):
    sha256: str = Field(pattern=SHA256_PATTERN)
    size_bytes: int = Field(ge=0)


class Manifest(_Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    created_at: datetime
    dataset: DatasetInfo
    libraries: LibraryVersions
    estimator: EstimatorInfo
    features: list[FeatureSpec] = Field(min_length=1, max_length=4096)
    classes: list[str] = Field(min_length=2)
    metrics: EvaluationMetrics
    parity: ParityReport
    onnx: OnnxInfo | None = None
    backend: Backend = Field(
        description="The backend this bundle supports best; 'sklearn' means no usable ONNX model."
    )
    files: dict[Annotated[str, Field(pattern=FILE_NAME_PATTERN)], FileEntry]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names must be unique")
        if MODEL_FILE_SKLEARN not in self.files:
            raise ValueError(f"files must list {MODEL_FILE_SKLEARN}")
        has_onnx = MODEL_FILE_ONNX in self.files
        if self.backend == "onnx" and not (has_onnx and self.onnx and self.parity.passed):
            raise ValueError(
                "backend 'onnx' needs model.onnx, its onnx section and a passed parity gate"
            )
        if has_onnx != (self.onnx is not None):
            raise ValueError("model.onnx and the onnx section come together")
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


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
