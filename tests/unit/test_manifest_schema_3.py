"""Manifest schema 3: nullable features with their missing rate, any column name,
an API name of its own; schema 2 manifests validate unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.manifest import Manifest

SCHEMA_3_FEATURE_KEYS = ("nullable", "missing_rate", "api_name", "bounds_declared")
USABLE_NAMES = [
    "sepal length (cm)",
    "income-2023",
    "od280/od315_of_diluted_wines",
    "n children",
    "größe",
    "2nd reading",
    "a.b",
    "x" * 200,
]


@pytest.fixture
def current(bundle_path: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((bundle_path / "manifest.json").read_text())
    return manifest


def test_a_schema_2_manifest_validates_unchanged(current: dict[str, Any]) -> None:
    schema_2 = {
        **current,
        "schema_version": 2,
        "features": [
            {k: v for k, v in f.items() if k not in SCHEMA_3_FEATURE_KEYS}
            for f in current["features"]
        ],
    }
    manifest = Manifest.model_validate(schema_2)
    assert manifest.schema_version == 2
    assert not any(f.nullable for f in manifest.features)
    assert manifest.field_names == manifest.feature_names
    # Its bounds still refuse, as they did.
    assert all(f.exclusive_minimum == 0.0 for f in manifest.features)  # type: ignore[union-attr]


def test_the_packager_writes_schema_3(current: dict[str, Any]) -> None:
    assert current["schema_version"] == 3
    assert Manifest.model_validate(current).schema_version == 3


def test_any_column_name_is_a_feature_name_and_a_renamed_one_keeps_both(
    current: dict[str, Any],
) -> None:
    features = current["features"]
    features[0] = {**features[0], "name": USABLE_NAMES[0], "api_name": "sepal_length"}
    for feature, name in zip(features[1:], USABLE_NAMES[1:], strict=False):
        feature["name"] = name
    features[1] |= {"nullable": True, "missing_rate": 0.2}
    manifest = Manifest.model_validate(current)
    assert manifest.feature_names == [USABLE_NAMES[0], *USABLE_NAMES[1:4]]
    assert manifest.field_names == ["sepal_length", *USABLE_NAMES[1:4]]
    assert manifest.features[1].nullable
    assert manifest.features[1].missing_rate == 0.2


@pytest.mark.parametrize(
    ("name", "api_name"),
    [("", None), ("tab\there", None), ("x" * 201, None), ("ok", "new\nline"), ("ok", "")],
)
def test_unusable_names_are_refused(
    current: dict[str, Any], name: str, api_name: str | None
) -> None:
    current["features"][0] |= {"name": name, "api_name": api_name}
    with pytest.raises(ValidationError, match=r"features\.0\.number\.(api_)?name"):
        Manifest.model_validate(current)


def test_two_features_with_one_api_name_are_refused(current: dict[str, Any]) -> None:
    current["features"][0]["api_name"] = current["features"][1]["name"]
    with pytest.raises(ValidationError, match="feature API names must be unique"):
        Manifest.model_validate(current)


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_a_missing_rate_is_a_share(current: dict[str, Any], rate: float) -> None:
    current["features"][0]["missing_rate"] = rate
    with pytest.raises(ValidationError, match="missing_rate"):
        Manifest.model_validate(current)


def test_request_fields_are_the_feature_names_whatever_python_makes_of_them(
    current: dict[str, Any],
) -> None:
    from service.schemas import build_request_models

    names = ["sepal length (cm)", "class", "model_year", "copy"]
    for feature, name in zip(current["features"], names, strict=True):
        feature["name"] = name
    models = build_request_models(Manifest.model_validate(current), max_batch_size=10)
    body = dict.fromkeys(names, 1.5)
    instance = models.instance.model_validate(body)
    assert instance.model_dump(by_alias=True) == body
    assert list(models.instance.model_json_schema()["properties"]) == names


@pytest.mark.parametrize("native_dtype", ["category", "object"])
def test_only_a_pandas_category_feature_rides_the_float_matrix_input(
    current: dict[str, Any], native_dtype: str
) -> None:
    """A float matrix holds a category as its code: a graph converted from pandas
    `category` codes reads it; one converted from strings needs string inputs."""
    assert current["onnx"]["input_name"] is not None
    current["features"][0] = {
        "name": current["features"][0]["name"],
        "description": current["features"][0]["description"],
        "kind": "category",
        "categories": ["red", "green"],
        "native_dtype": native_dtype,
    }
    if native_dtype == "category":
        assert Manifest.model_validate(current).onnx is not None
        return
    with pytest.raises(ValidationError, match=r"needs onnx\.column_inputs unless its native_dtype"):
        Manifest.model_validate(current)
