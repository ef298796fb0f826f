"""Which V2 inputs a manifest's features become."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.manifest import Manifest
from service.v2.infer import InferenceCodec
from service.v2.mapping import CategoryTensor, tensor_map
from service.v2.tensors import TensorError


def _manifest(trained_bundle: Path, categories: dict[int, str]) -> Manifest:
    """The iris manifest with some features turned into category features named as given."""
    raw = json.loads((trained_bundle / "manifest.json").read_text())
    for index, name in categories.items():
        raw["features"][index] = {
            "kind": "category",
            "name": name,
            "description": name,
            "unit": None,
            "categories": ["a", "b"],
        }
    # Category features need the ONNX layout of one input per column.
    raw["onnx"].pop("input_name")
    raw["onnx"]["column_inputs"] = [feature["name"] for feature in raw["features"]]
    return Manifest.model_validate(raw)


def test_a_category_feature_named_features_does_not_hide_the_numeric_matrix(
    trained_bundle: Path,
) -> None:
    tensors = tensor_map(_manifest(trained_bundle, {3: "features"}))
    assert [(t.name, t.datatype) for t in tensors.inputs] == [
        ("features", "FP32"),
        ("features_category", "BYTES"),
    ]
    category = tensors.inputs[1]
    assert isinstance(category, CategoryTensor)
    assert category.feature_names == ("features",)
    assert tensors.properties["categories"] == {"features_category": ["a", "b"]}
    codec = InferenceCodec(tensors, "iris", "1.0.0", max_rows=10)
    request: dict[str, Any] = {
        "inputs": [
            {"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [5.1, 3.5, 1.4]},
            {"name": "features_category", "shape": [1], "datatype": "BYTES", "data": ["b"]},
        ]
    }
    rows = codec.decode(json.dumps(request).encode(), None).rows
    assert rows.tolist() == [[5.1, 3.5, 1.4, 1.0]]


def test_a_model_of_category_features_only_has_no_numeric_matrix(trained_bundle: Path) -> None:
    tensors = tensor_map(_manifest(trained_bundle, {0: "w", 1: "x", 2: "y", 3: "z"}))
    assert [(t.name, t.shape) for t in tensors.inputs] == [(n, [-1]) for n in "wxyz"]
    codec = InferenceCodec(tensors, "iris", "1.0.0", max_rows=10)
    inputs = [
        {"name": name, "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}
        for name in "zyxw"
    ]
    rows = codec.decode(json.dumps({"inputs": inputs}).encode(), None).rows
    assert rows.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    inputs[0]["data"] = [["a"], ["c"]]
    with pytest.raises(TensorError, match="input 'z' row 1 feature 'z': \"c\" is not one of"):
        codec.decode(json.dumps({"inputs": inputs}).encode(), None)
