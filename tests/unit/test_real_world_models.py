"""Notebook-style models (imputers on numbers and strings, NaN in boosted trees,
pandas `category` columns), packaged by the real packager: the backend chosen,
and each backend's answers on rows with missing values equal to the model's own."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest

from service.backends import load_backend
from service.bundle import verify_bundle
from service.settings import ServiceSettings
from tests.support.bundles import pinned_digests
from tests.support.user_models import (
    BUILDERS,
    COLORS,
    UserModel,
    backend_rows,
    lightgbm_with_category,
    package_user_model,
    titanic_logistic_regression,
)
from tests.unit.test_training_cli import run
from training import onnx_export
from training.datasets import FeatureInfo
from training.native_categories import native_categories
from training.package import PackageConfig, package

REAL_WORLD = [
    "titanic_logistic_regression",
    "titanic_random_forest",
    "xgboost_with_nan",
    "lightgbm_with_category",
    "xgboost_with_category",
    "hist_gradient_boosting_native",
]
# Boosted trees whose graph takes each pandas category as its code.
CATEGORY_CODES = ["lightgbm_with_category", "xgboost_with_category"]
ROWS = 120
# ONNX computes in float32; probabilities differ from float64 in the 7th digit.
TOLERANCE = 1e-5


def model_input(user: UserModel, frame: pd.DataFrame) -> Any:
    return frame.to_numpy() if user.features is not None else frame


@pytest.mark.parametrize("key", REAL_WORLD)
def test_each_backend_answers_like_the_model_on_rows_with_missing_values(
    key: str, tmp_path: Path
) -> None:
    user, path = package_user_model(key, tmp_path, parity_random_rows=300)
    bundle = verify_bundle(path)
    manifest = bundle.manifest
    assert manifest.backend == user.expected_backend, manifest.parity.reason
    if manifest.backend == "sklearn":
        # The reason names the step, and what a row costs natively.
        assert manifest.parity.reason is not None
        assert "µs/row" in manifest.parity.reason
    frame = user.x.head(ROWS)
    assert frame.isna().any().any()  # rows with missing values are compared
    expected = user.model.predict_proba(model_input(user, frame))
    rows = backend_rows(manifest, frame)
    trusted = frozenset(pinned_digests(path.parent.parent).split(","))
    backends = ["onnx", "sklearn"] if manifest.backend == "onnx" else ["sklearn"]
    for name in backends:
        served = load_backend(bundle, name, trusted).predict(rows)  # type: ignore[arg-type]
        np.testing.assert_allclose(served, expected, atol=TOLERANCE, err_msg=name)


def test_the_titanic_pipeline_converts_and_its_gate_compares_missing_values(
    tmp_path: Path,
) -> None:
    """The string imputer's NaN has no converter as written; the equivalent
    graph passes the gate on reference rows with NaN and random rows with
    every feature missing at random."""
    user = titanic_logistic_regression()
    kinds = {"pclass": "integer", "sex": "category", "embarked": "category"}
    infos = [FeatureInfo(n, n, None, kinds.get(n, "number")) for n in user.x.columns]  # type: ignore[arg-type]
    inputs = onnx_export.ModelInput(infos, as_frame=True)
    reference = user.x.astype(object).to_numpy()
    assert pd.isna(reference).any(axis=0).tolist() == [False, True, False, False, True]
    specs: list[dict[str, Any]] = [
        {"kind": "category", "categories": ["male", "female"]}
        if f.kind == "category" and f.name == "sex"
        else {"kind": "category", "categories": ["S", "C", "Q"]}
        if f.kind == "category"
        else {"kind": f.kind, "training_min": 1.0, "training_max": 80.0}
        for f in infos
    ]
    # Missing in the reference rows, or declared nullable: the random rows
    # leave these missing at random too.
    specs[0]["nullable"] = True
    assert onnx_export.nullable_features(specs, reference) == [0, 1, 4]
    probes = onnx_export.with_missing_values(onnx_export.random_rows(specs, 400), [0, 1, 4])
    assert pd.isna(probes).any(axis=0).tolist() == [True, True, False, False, True]
    outcome = onnx_export.export(
        user.model,
        inputs,
        "classification",
        specs,
        reference,
        parity_random_rows=400,
        tolerance=TOLERANCE,
    )
    assert outcome.parity.passed, outcome.parity.reason
    assert outcome.parity.test_rows == len(reference)
    assert outcome.model_bytes is not None


@pytest.mark.parametrize("key", CATEGORY_CODES)
def test_category_codes_pass_the_gate_with_missing_categories(key: str, tmp_path: Path) -> None:
    """The graph takes each pandas category as its code in one float matrix; a
    missing category is a NaN code, which the gate compares when the feature
    is nullable, and the ONNX backend answers such rows as the model does."""
    nullable = ("size", "weight", "color")
    user, path = package_user_model(key, tmp_path, parity_random_rows=300, nullable=nullable)
    bundle = verify_bundle(path)
    manifest = bundle.manifest
    assert manifest.backend == "onnx", manifest.parity.reason
    assert manifest.onnx is not None
    assert manifest.onnx.input_name is not None
    # The gate's random rows left each of these missing at random.
    assert [f.name for f in manifest.features if f.nullable] == list(nullable)
    frame = user.x.head(ROWS).copy()
    frame.loc[frame.index % 4 == 0, "color"] = np.nan
    frame.loc[frame.index % 5 == 0, "weight"] = np.nan
    assert frame.color.isna().any()
    assert frame.weight.isna().any()
    onnx = load_backend(bundle, "onnx", frozenset())
    np.testing.assert_allclose(
        onnx.predict(backend_rows(manifest, frame)),
        user.model.predict_proba(frame),
        atol=TOLERANCE,
    )


def test_a_step_onnx_cannot_express_is_named_with_its_cost(tmp_path: Path) -> None:
    _, path = package_user_model("custom_function_pipeline", tmp_path, parity_random_rows=50)
    reason = json.loads((path / "manifest.json").read_text())["parity"]["reason"]
    assert reason.startswith("functiontransformer: conversion failed: "), reason
    assert "onnx unavailable, sklearn " in reason


def test_a_gate_failure_names_the_steps_whose_rounding_the_trees_split_on(
    tmp_path: Path,
) -> None:
    """The forest's graph alone, fed scikit-learn's own output of `prep`, agrees:
    the reason blames `prep` (float32 in the graph), with both backends' cost."""
    _, path = package_user_model("titanic_random_forest", tmp_path, parity_random_rows=300)
    reason = json.loads((path / "manifest.json").read_text())["parity"]["reason"]
    assert reason.startswith(
        "prep: the graph computes it in float32 (scikit-learn in float64), and model "
        "amplifies the difference: max probability difference "
    ), reason
    assert re.search(r" \(onnx \d+ µs/row, sklearn \d+ µs/row\)$", reason), reason


def test_the_summary_says_parity_was_not_run_when_it_was_not(tmp_path: Path) -> None:
    user = lightgbm_with_category()
    joblib.dump(user.model, tmp_path / "model.joblib")
    user.reference.dropna().to_csv(tmp_path / "reference.csv", index=False)
    result = run(
        "package",
        tmp_path / "model.joblib",
        "--name",
        "colors",
        "--version",
        "1.0.0",
        "--output-dir",
        tmp_path / "models",
        "--reference-data",
        tmp_path / "reference.csv",
        "--target",
        "label",
        "--no-onnx",
    )
    assert result.returncode == 0, result.stderr
    summary = result.stdout.splitlines()[0]
    assert summary.endswith("backend sklearn, parity not run"), summary


@pytest.mark.parametrize("key", CATEGORY_CODES)
def test_a_category_column_is_typed_with_the_models_own_categories(
    key: str, tmp_path: Path
) -> None:
    _, path = package_user_model(key, tmp_path, parity_random_rows=50)
    manifest = json.loads((path / "manifest.json").read_text())
    color = next(f for f in manifest["features"] if f["name"] == "color")
    assert color["kind"] == "category"
    assert color["native_dtype"] == "category"
    # LightGBM's pandas_categorical, XGBoost's recorded categories: the fitted
    # DataFrame's own categories in its order (neither alphabetical nor by
    # frequency in the reference data).
    assert color["categories"] == list(COLORS) != sorted(COLORS)
    assert sum(color["frequencies"]) == pytest.approx(1.0)


@pytest.mark.parametrize("key", CATEGORY_CODES)
def test_codes_in_another_order_than_the_models_get_no_graph(key: str) -> None:
    """A code is an index into the model's own categories: categories in any
    other order (the reference data's, where a model records none) would feed
    the graph codes the model never split on, so the packager serves the
    model natively and says why."""
    user = BUILDERS[key]()
    kinds = {"color": "category"}
    infos = [FeatureInfo(n, n, None, kinds.get(n, "number")) for n in user.x.columns]  # type: ignore[arg-type]
    specs: list[dict[str, Any]] = [
        {"kind": "category", "categories": sorted(COLORS)}
        if f.kind == "category"
        else {"kind": f.kind, "training_min": -3.0, "training_max": 3.0}
        for f in infos
    ]
    reference = user.x.astype(object).to_numpy()
    outcome = onnx_export.export(
        user.model,
        onnx_export.ModelInput(infos, as_frame=True, category_dtypes={"color": sorted(COLORS)}),
        "classification",
        specs,
        reference,
        parity_random_rows=50,
        tolerance=TOLERANCE,
    )
    assert outcome.model_bytes is None
    assert (outcome.parity.reason or "").startswith("model: pandas category columns (color) ")


def test_native_categories_are_read_from_each_library() -> None:
    """Pins the internals training.native_categories reads."""
    import lightgbm
    import xgboost
    from sklearn.ensemble import HistGradientBoostingClassifier

    frame = pd.DataFrame(
        {
            "n": np.arange(60, dtype=float),
            "c": pd.Categorical(["b", "a", "c"] * 20, categories=["c", "b", "a"]),
        }
    )
    label = np.arange(60) % 2
    names = list(frame.columns)
    lgbm = lightgbm.LGBMClassifier(n_estimators=2, verbose=-1, min_child_samples=2)
    assert native_categories(lgbm.fit(frame, label), names) == {"c": ["c", "b", "a"]}
    hgb = HistGradientBoostingClassifier(max_iter=2, categorical_features="from_dtype")
    assert native_categories(hgb.fit(frame, label), names) == {"c": ["a", "b", "c"]}
    # XGBoost 3.1+ records them (Booster.get_categories, as Arrow arrays):
    # after the numeric column, and in the DataFrame's order.
    xgb = xgboost.XGBClassifier(n_estimators=2, enable_categorical=True)
    assert native_categories(xgb.fit(frame, label), names) == {"c": ["c", "b", "a"]}
    plain = HistGradientBoostingClassifier(max_iter=2).fit(frame[["n"]], label)
    assert native_categories(plain, ["n"]) == {}


def test_the_packager_records_the_digest_the_service_trusts(tmp_path: Path) -> None:
    user = lightgbm_with_category()
    joblib.dump(user.model, tmp_path / "model.joblib")
    digests = tmp_path / "etc" / "trusted-model-sha256"
    config = PackageConfig(
        model_file=tmp_path / "model.joblib",
        name="colors",
        version="1.0.0",
        output_dir=tmp_path / "models",
        parity_random_rows=50,
        trusted_digests_file=digests,
    )
    path = package(config, warn=lambda _: None)
    recorded = digests.read_text()
    assert recorded == f"{pinned_digests(tmp_path / 'models')}  colors/1.0.0/model.joblib\n"
    # Packaging again with --force records nothing twice.
    package(PackageConfig(**{**config.__dict__, "force": True}), warn=lambda _: None)
    assert digests.read_text() == recorded
    settings = ServiceSettings(model_dir=tmp_path / "models", trusted_digests_file=digests)
    bundle = verify_bundle(path)
    backend = load_backend(bundle, "sklearn", settings.trusted_model_digests())
    frame = user.x.head(20)
    np.testing.assert_allclose(
        backend.predict(backend_rows(bundle.manifest, frame)),
        user.model.predict_proba(frame),
        atol=TOLERANCE,
    )


def test_a_digests_file_inside_the_output_directory_is_refused(tmp_path: Path) -> None:
    user = lightgbm_with_category()
    joblib.dump(user.model, tmp_path / "model.joblib")
    config = PackageConfig(
        model_file=tmp_path / "model.joblib",
        name="colors",
        version="1.0.0",
        output_dir=tmp_path / "models",
        trusted_digests_file=tmp_path / "models" / "sums",
    )
    from training.errors import TrainingError

    with pytest.raises(TrainingError, match="is inside --output-dir"):
        package(config, warn=lambda _: None)
    assert not (tmp_path / "models").exists()
