"""ONNX export: the parity gate, and falling back to an sklearn-only bundle when it fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnxruntime as ort
import pytest

from training import onnx_export
from training.datasets import load_builtin
from training.features import feature_specs
from training.fit import FitResult, fit
from training.pipeline import TrainConfig, train


def fast(tmp_path: Path, **overrides: Any) -> TrainConfig:
    """Small forest and few probes: these tests pin behaviour, not model quality."""
    settings: dict[str, Any] = {"n_estimators": 10, "parity_random_rows": 500, "min_accuracy": 0.0}
    return TrainConfig(output_dir=tmp_path, **(settings | overrides))


@pytest.fixture(scope="module")
def iris_fit() -> FitResult:
    return fit(
        load_builtin("iris"), n_estimators=10, max_depth=None, random_state=0, test_size=0.25
    )


IRIS_INPUT = onnx_export.ModelInput(load_builtin("iris").features)


def specs_of(result: FitResult) -> list[dict[str, Any]]:
    return feature_specs(result.X_train, IRIS_INPUT.features)


def manifest_of(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return loaded


def test_export_passes_the_gate_and_records_graph_names(iris_fit: FitResult) -> None:
    outcome = onnx_export.export(
        iris_fit.model,
        IRIS_INPUT,
        "classification",
        specs_of(iris_fit),
        iris_fit.X_test,
        parity_random_rows=500,
        tolerance=1e-5,
    )
    assert outcome.model_bytes is not None
    assert outcome.info is not None
    assert outcome.info["input_name"] == "input"
    assert outcome.info["label_output"] == "label"
    assert outcome.info["probabilities_output"] == "probabilities"
    assert outcome.info["opset"] >= 1
    report = outcome.parity
    assert report.passed
    assert report.reason is None
    assert report.test_rows == len(iris_fit.X_test)
    assert report.random_rows == 500
    assert report.class_mismatches == 0
    assert report.compared == "probabilities"
    assert report.max_abs_diff is not None
    assert report.max_abs_diff <= 1e-5


def test_onnxruntime_predictions_equal_sklearn_predictions_from_the_bundle(
    tmp_path: Path,
) -> None:
    path = train(fast(tmp_path))
    manifest = manifest_of(path)
    assert manifest["backend"] == "onnx"
    assert manifest["parity"]["passed"] is True
    onnx_info = manifest["onnx"]

    model = joblib.load(path / "model.joblib")
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = load_builtin("iris").X.astype(np.float32)
    labels, proba = session.run(
        [onnx_info["label_output"], onnx_info["probabilities_output"]],
        {onnx_info["input_name"]: rows},
    )
    assert proba.dtype == np.float32
    assert proba.shape == (150, 3)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, model.predict(rows.astype(np.float64)))
    np.testing.assert_allclose(proba, model.predict_proba(rows.astype(np.float64)), atol=1e-5)


def test_gate_fails_against_a_different_sklearn_model(iris_fit: FitResult) -> None:
    model_bytes = onnx_export.convert(iris_fit.model, IRIS_INPUT, "classification")
    info = onnx_export.graph_info(model_bytes, "classification", 4)
    other = fit(
        load_builtin("iris"), n_estimators=3, max_depth=1, random_state=7, test_size=0.25
    ).model
    probes = onnx_export.random_rows(specs_of(iris_fit), 500)
    report = onnx_export.check_parity(
        model_bytes, info, other, IRIS_INPUT, "classification", iris_fit.X_test, probes, 1e-5
    )
    assert not report.passed
    assert report.class_mismatches > 0
    assert report.reason is not None
    assert "class mismatches in 500 random rows" in report.reason
    assert report.max_abs_diff is not None
    assert report.max_abs_diff > 1e-5


def test_random_parity_rows_stay_inside_the_training_box() -> None:
    lo, hi = np.array([1.0, -5.0]), np.array([2.0, 5.0])
    specs = [
        {"kind": "number", "training_min": 1.0, "training_max": 2.0},
        {"kind": "integer", "training_min": -5.0, "training_max": 5.0},
    ]
    rows = onnx_export.random_rows(specs, 1000)
    assert rows.shape == (1000, 2)
    assert (rows >= lo).all()
    assert (rows <= hi).all()
    assert (rows[:, 1] == np.round(rows[:, 1])).all()
    np.testing.assert_array_equal(rows, onnx_export.random_rows(specs, 1000))  # seeded


def test_failed_parity_gate_writes_an_sklearn_only_bundle_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_check = onnx_export.check_parity

    def check_against_other_model(
        model_bytes: bytes, info: dict[str, Any], model: Any, *args: Any
    ) -> onnx_export.ParityReport:
        other = fit(
            load_builtin("iris"), n_estimators=2, max_depth=1, random_state=3, test_size=0.25
        ).model
        return real_check(model_bytes, info, other, *args)

    monkeypatch.setattr(onnx_export, "check_parity", check_against_other_model)
    path = train(fast(tmp_path))

    manifest = manifest_of(path)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.joblib"]
    assert manifest["backend"] == "sklearn"
    assert manifest["onnx"] is None
    assert set(manifest["files"]) == {"model.joblib"}
    assert manifest["parity"]["passed"] is False
    assert "class mismatches" in manifest["parity"]["reason"]
    assert manifest["libraries"]["onnxruntime"] is None
    assert "training: warning: writing an sklearn-only bundle" in capsys.readouterr().err


def test_conversion_failure_writes_an_sklearn_only_bundle_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_convert(model: Any, *args: Any) -> bytes:
        raise RuntimeError("Unable to find a shape calculator\nfor type X")

    monkeypatch.setattr(onnx_export, "convert", broken_convert)
    warnings: list[str] = []
    path = train(fast(tmp_path), warn=warnings.append)

    parity = manifest_of(path)["parity"]
    assert parity["passed"] is False
    # The step (the whole model here), the converter's message on one line, and
    # what a row costs on each backend.
    assert parity["reason"].startswith(
        "model: conversion failed: RuntimeError: Unable to find a shape calculator for type X "
        "(onnx unavailable, sklearn "
    )
    assert parity["reason"].endswith(" µs/row)")
    assert not (path / "model.onnx").exists()
    assert len(warnings) == 1
    assert "conversion failed" in warnings[0]


def test_no_onnx_writes_an_sklearn_only_bundle_and_never_converts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_convert(model: Any, n_features: int) -> bytes:
        raise AssertionError("converted despite --no-onnx")

    monkeypatch.setattr(onnx_export, "convert", must_not_convert)
    warnings: list[str] = []
    path = train(fast(tmp_path, onnx=False), warn=warnings.append)

    manifest = manifest_of(path)
    assert manifest["backend"] == "sklearn"
    assert manifest["onnx"] is None
    assert manifest["parity"] == {
        "passed": False,
        "test_rows": 0,
        "random_rows": 0,
        "class_mismatches": 0,
        "compared": "probabilities",
        "max_abs_diff": None,
        "max_rel_diff": None,
        "tolerance": 1e-5,
        "reason": "disabled by --no-onnx",
    }
    assert {k: manifest["libraries"][k] for k in ("skl2onnx", "onnx", "onnxruntime")} == {
        "skl2onnx": None,
        "onnx": None,
        "onnxruntime": None,
    }
    assert warnings == ["writing an sklearn-only bundle (no model.onnx): disabled by --no-onnx"]
