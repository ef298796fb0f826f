"""Request models generated from a manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.manifest import Manifest
from service.schemas import FLOAT32_MAX, build_request_models


def _manifest(trained_bundle: Path, **feature_changes: Any) -> Manifest:
    raw = json.loads((trained_bundle / "manifest.json").read_text())
    for feature in raw["features"]:
        feature.update(feature_changes)
    return Manifest.model_validate(raw)


def test_one_strict_float_field_per_feature(trained_bundle: Path) -> None:
    models = build_request_models(_manifest(trained_bundle), max_batch_size=10)
    assert list(models.instance.model_fields) == [
        "sepal_length",
        "sepal_width",
        "petal_length",
        "petal_width",
    ]
    models.instance.model_validate(models.example)
    with pytest.raises(ValidationError):
        models.instance.model_validate_json(b'{"sepal_length": "5"}')


def test_unbounded_features_still_reject_values_beyond_float32(trained_bundle: Path) -> None:
    manifest = _manifest(trained_bundle, minimum=None, exclusive_minimum=None, maximum=None)
    models = build_request_models(manifest, max_batch_size=10)
    row = dict(models.example)
    models.instance.model_validate({**row, "sepal_length": FLOAT32_MAX})
    models.instance.model_validate({**row, "sepal_length": -FLOAT32_MAX})
    for value in (3.5e38, -3.5e38):
        with pytest.raises(ValidationError, match=r"sepal_length"):
            models.instance.model_validate({**row, "sepal_length": value})


def test_exclusive_bounds_exclude_the_edge(trained_bundle: Path) -> None:
    models = build_request_models(_manifest(trained_bundle), max_batch_size=10)
    with pytest.raises(ValidationError, match=r"greater than 0"):
        models.instance.model_validate({**models.example, "petal_width": 0.0})


def test_batch_model_enforces_the_configured_size(trained_bundle: Path) -> None:
    models = build_request_models(_manifest(trained_bundle), max_batch_size=3)
    models.batch.model_validate({"instances": [models.example] * 3})
    with pytest.raises(ValidationError, match=r"at most 3"):
        models.batch.model_validate({"instances": [models.example] * 4})


def test_model_names_follow_the_bundle_name(trained_bundle: Path) -> None:
    raw = json.loads((trained_bundle / "manifest.json").read_text())
    raw["name"] = "breast_cancer-v2"
    models = build_request_models(Manifest.model_validate(raw), max_batch_size=3)
    assert models.instance.__name__ == "BreastCancerV2Instance"
    assert models.batch.__name__ == "BreastCancerV2BatchRequest"
