"""The manifest contract: one definition, exported for training, strict about its content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from service.manifest import Manifest, json_schema_text
from tests.support.bundles import REPO


def _manifest(bundle: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    return loaded


def test_training_schema_is_generated_from_the_service_model() -> None:
    committed = (REPO / "training" / "manifest.schema.json").read_text()
    assert committed == json_schema_text(), "run `make schema`"


def test_a_trained_manifest_satisfies_both_sides(trained_bundle: Path) -> None:
    raw = _manifest(trained_bundle)
    schema = json.loads((REPO / "training" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(raw)
    manifest = Manifest.model_validate(raw)
    assert manifest.feature_names == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert manifest.backend == "onnx"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m["files"].update({"../evil.py": m["files"]["model.joblib"]}), "files"),
        (lambda m: m["files"].pop("model.joblib"), "model.joblib"),
        (lambda m: m.update(version="1.0"), "version"),
        (lambda m: m["features"].append(m["features"][0]), "unique"),
        (
            lambda m: m["features"][0].update(deciles=list(reversed(m["features"][0]["deciles"]))),
            "deciles",
        ),
        (lambda m: m["parity"].update(passed=False), "parity"),
        (lambda m: m.update(surprise=1), "surprise"),
        (lambda m: m["files"]["model.onnx"].update(sha256="0" * 63), "sha256"),
        # Class names reach label values, answers and the master's log: bounded.
        (lambda m: m.update(classes=[f"c{i}" for i in range(1001)]), "classes"),
        (lambda m: m["classes"].__setitem__(0, "x" * 201), "classes"),
        (lambda m: m["classes"].__setitem__(0, ""), "classes"),
    ],
)
def test_inconsistent_manifests_are_rejected(
    trained_bundle: Path, mutate: Any, message: str
) -> None:
    raw = _manifest(trained_bundle)
    mutate(raw)
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate(raw)


NEW_PARITY_FIELDS = ("compared", "max_abs_diff", "max_rel_diff")


def test_a_schema_1_manifest_from_before_user_models_still_validates(model_dir: Path) -> None:
    """Bundles written before manifests had a task and feature kinds keep serving."""
    current = json.loads((model_dir / "iris" / "1.0.0" / "manifest.json").read_text())
    metrics, parity = dict(current["metrics"]), dict(current["parity"])
    schema_1 = {
        **current,
        "schema_version": 1,
        "features": [
            {k: v for k, v in feature.items() if k != "kind"} for feature in current["features"]
        ],
        "metrics": {
            "accuracy": metrics["accuracy"],
            "f1_macro": metrics["f1_macro"],
            "n_train": metrics["n_train"],
            "n_test": metrics["n_rows"],
            "test_size": metrics["test_size"],
        },
        "parity": {
            **{
                k: v
                for k, v in parity.items()
                if k not in ("compared", "max_abs_diff", "max_rel_diff")
            },
            "max_abs_probability_diff": parity["max_abs_diff"],
        },
    }
    del schema_1["task"]
    upgraded = Manifest.model_validate(schema_1)
    assert upgraded.task == "classification"
    assert [f.kind for f in upgraded.features] == ["number"] * len(current["features"])
    assert upgraded.metrics is not None
    assert upgraded.metrics.n_rows == metrics["n_rows"]
    assert upgraded.parity.max_abs_diff == parity["max_abs_diff"]
