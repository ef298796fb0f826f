"""Models the user already has, packaged and served: answers equal the estimator's own.

Each bundle is built here by the real packager from small synthetic or
scikit-learn-shipped data (nothing is downloaded), then served by the real app
on every backend the bundle supports.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from tests.support.bundles import pinned_digests
from tests.support.user_models import BUILDERS, UserModel, one_hot_pipeline, package_user_model
from training.package import PackageConfig, package

ROWS_COMPARED = 60
# Probabilities travel rounded to 7 decimals and ONNX computes in float32.
PROBABILITY_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Packaged:
    user: UserModel
    model_dir: Path
    name: str
    manifest: dict[str, Any]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def packaged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Packaged:
    import json

    name = request.param.replace("_", "-")
    work = tmp_path_factory.mktemp(request.param)
    user, path = package_user_model(request.param, work, parity_random_rows=500)
    manifest = json.loads((path / "manifest.json").read_text())
    return Packaged(user, work / "models", name, manifest)


def _backends(packaged: Packaged) -> list[str]:
    return ["onnx", "sklearn"] if packaged.manifest["backend"] == "onnx" else ["sklearn"]


@pytest.fixture
def clients(packaged: Packaged) -> Iterator[dict[str, TestClient]]:
    opened: dict[str, TestClient] = {}
    try:
        for backend in _backends(packaged):
            settings = ServiceSettings(
                model_dir=packaged.model_dir,
                model_name=packaged.name,
                backend=backend,
                trusted_model_sha256=pinned_digests(packaged.model_dir),
            )
            client = TestClient(create_app(settings), raise_server_exceptions=False)
            opened[backend] = client.__enter__()
        yield opened
    finally:
        for client in opened.values():
            client.__exit__(None, None, None)


def _complete_rows(user: UserModel) -> pd.DataFrame:
    # Rows without a missing value: a request cannot carry one yet
    # (tests/unit/test_real_world_models.py compares rows with NaN at the backends).
    return user.x.dropna().head(ROWS_COMPARED)


def _instances(user: UserModel) -> list[dict[str, Any]]:
    rows = _complete_rows(user).to_dict(orient="records")
    return [{k: v.item() if isinstance(v, np.generic) else v for k, v in r.items()} for r in rows]


def _estimator_input(user: UserModel) -> Any:
    x = _complete_rows(user)
    return x if user.features is None else x.to_numpy()


def test_the_backend_is_onnx_wherever_conversion_passed_parity(packaged: Packaged) -> None:
    manifest = packaged.manifest
    assert manifest["backend"] == packaged.user.expected_backend, manifest["parity"]["reason"]
    assert (manifest["backend"] == "onnx") == manifest["parity"]["passed"]
    if not manifest["parity"]["passed"]:
        assert manifest["parity"]["reason"]


def test_answers_equal_the_estimators_own(
    packaged: Packaged, clients: dict[str, TestClient]
) -> None:
    user = packaged.user
    instances = _instances(user)
    for backend, client in clients.items():
        response = client.post("/predict/batch", json={"instances": instances})
        assert response.status_code == 200, (backend, response.text)
        answers = response.json()["predictions"]
        if packaged.manifest["task"] == "classification":
            expected = user.model.predict_proba(_estimator_input(user))
            served = np.array([list(a["probabilities"].values()) for a in answers])
            np.testing.assert_allclose(served, expected, atol=PROBABILITY_TOLERANCE)
            winners = [a["predicted_class"] for a in answers]
            assert winners == expected.argmax(axis=1).tolist(), backend
        else:
            expected = user.model.predict(_estimator_input(user))
            served = np.array([a["prediction"] for a in answers])
            np.testing.assert_allclose(served, expected, rtol=RELATIVE_TOLERANCE, atol=1e-3)
        single = client.post("/predict", json=instances[0]).json()
        assert single["model_version"] == "1.0.0"
        assert {k: v for k, v in single.items() if k != "model_version"} == answers[0]


def test_class_names_come_from_the_reference_target(packaged: Packaged) -> None:
    if packaged.name == "article-forest":
        assert packaged.manifest["classes"] == ["setosa", "versicolor", "virginica"]
    elif packaged.name == "one-hot-pipeline":
        assert packaged.manifest["classes"] == ["cheap", "dear"]


def _wrong_values(feature: dict[str, Any]) -> list[Any]:
    if feature["kind"] == "category":
        return [5, True, None, ["paris"], "atlantis"]
    wrong: list[Any] = ["1.0", True, None, [1.0]]
    return [*wrong, 1.5] if feature["kind"] == "integer" else wrong


def test_each_wrong_type_unknown_category_and_missing_field_is_a_422_naming_it(
    packaged: Packaged, clients: dict[str, TestClient]
) -> None:
    valid = _instances(packaged.user)[0]
    for client in clients.values():
        for feature in packaged.manifest["features"]:
            name = feature["name"]
            for value in _wrong_values(feature):
                response = client.post("/predict", json={**valid, name: value})
                assert response.status_code == 422, (name, value, response.text)
                assert response.json()["detail"][0]["loc"] == ["body", name], (name, value)
            missing = {k: v for k, v in valid.items() if k != name}
            response = client.post("/predict", json=missing)
            assert response.status_code == 422
            assert response.json()["detail"][0]["loc"] == ["body", name]


def test_metrics_count_categories_per_value_and_bucket_regression_outputs(
    packaged: Packaged, clients: dict[str, TestClient]
) -> None:
    client = next(iter(clients.values()))
    instances = _instances(packaged.user)[:5]
    assert client.post("/predict/batch", json={"instances": instances}).status_code == 200
    text = client.get("/metrics").text
    model = f'model="{packaged.name}"'
    for feature in packaged.manifest["features"]:
        if feature["kind"] == "category":
            value = instances[0][feature["name"]]
            assert f'feature="{feature["name"]}",{model},value="{value}"' in text or (
                f'value="{value}"' in text and "model_feature_category_total" in text
            )
    if packaged.manifest["task"] == "regression":
        deciles = packaged.manifest["target_statistics"]["deciles"]
        assert "model_prediction_value_bucket" in text
        assert f'le="{float(deciles[0])}"' in text


def test_without_reference_data_the_bundle_serves_and_says_drift_metrics_are_off(
    tmp_path: Path,
) -> None:
    user = one_hot_pipeline()
    joblib.dump(user.model, tmp_path / "model.joblib")
    package(
        PackageConfig(
            model_file=tmp_path / "model.joblib",
            name="houses",
            version="1.0.0",
            output_dir=tmp_path / "models",
            parity_random_rows=200,
        ),
        warn=lambda _: None,
    )
    settings = ServiceSettings(
        model_dir=tmp_path / "models",
        model_name="houses",
        trusted_model_sha256=pinned_digests(tmp_path / "models"),
    )
    with TestClient(create_app(settings)) as client:
        info = client.get("/model-info").json()
        assert info["backend"] == "onnx"
        assert info["drift_metrics"]["enabled"] is False
        assert "without reference data" in info["drift_metrics"]["reason"]
        city = next(f for f in info["features"] if f["name"] == "city")
        assert city["categories"] == ["lyon", "nice", "paris"]  # the encoder's own set
        instance = {"rooms": 3, "area": 80.0, "city": "lyon"}
        answer = client.post("/predict", json=instance).json()
        expected = user.model.predict_proba(pd.DataFrame([instance]))[0]
        served = list(answer["probabilities"].values())
        np.testing.assert_allclose(served, expected, atol=PROBABILITY_TOLERANCE)
        unknown = client.post("/predict", json={**instance, "city": "atlantis"})
        assert unknown.status_code == 422
        assert unknown.json()["detail"][0]["loc"] == ["body", "city"]
