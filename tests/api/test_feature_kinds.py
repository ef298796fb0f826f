"""Integer, number and category features in one regressor: schema, validation, answers, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from tests.support.bundles import pinned_digests
from tests.support.user_models import MIXED_NAME, mixed_regressor, package_mixed_regressor

VALID = {"rooms": 3, "area": 80.5, "city": "lyon"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_mixed_regressor(tmp_path_factory.mktemp("flats"))


@pytest.fixture
def flats(model_dir: Path) -> Iterator[TestClient]:
    settings = ServiceSettings(
        model_dir=model_dir, model_name=MIXED_NAME, trusted_model_sha256=pinned_digests(model_dir)
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _error(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    return dict(error)


def test_openapi_states_kinds_bounds_and_allowed_values(flats: TestClient) -> None:
    document = flats.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    properties = schemas["FlatsInstance"]["properties"]
    assert properties["city"]["enum"] == ["lyon", "nice", "paris"] or sorted(
        properties["city"]["enum"]
    ) == ["lyon", "nice", "paris"]
    assert properties["rooms"]["type"] == "integer"
    assert properties["rooms"]["exclusiveMinimum"] == 0
    assert isinstance(properties["rooms"]["maximum"], int)
    assert properties["area"]["type"] == "number"
    ok = document["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["$ref"].endswith("/RegressionPredictionResponse")


def test_the_docs_example_is_built_from_the_reference_data(flats: TestClient) -> None:
    _, reference = mixed_regressor()
    document = flats.get("/openapi.json").json()
    (example,) = document["components"]["schemas"]["FlatsInstance"]["examples"]
    assert example["city"] == reference.city.value_counts().idxmax()
    assert example["rooms"] == round(reference.rooms.mean())
    assert example["area"] == pytest.approx(reference.area.mean(), abs=0.01)
    assert flats.post("/predict", json=example).status_code == 200


def test_a_regression_answer_is_the_prediction_and_the_version(flats: TestClient) -> None:
    model, _ = mixed_regressor()
    import pandas as pd

    body = flats.post("/predict", json=VALID).json()
    assert set(body) == {"prediction", "model_version"}
    assert body["prediction"] == pytest.approx(model.predict(pd.DataFrame([VALID]))[0], rel=1e-5)
    batch = flats.post("/predict/batch", json={"instances": [VALID, VALID]}).json()
    assert batch["model_version"] == "1.0.0"
    # float32 kernels may round the last digit differently for another batch size.
    assert [set(p) for p in batch["predictions"]] == [{"prediction"}] * 2
    for answer in batch["predictions"]:
        assert answer["prediction"] == pytest.approx(body["prediction"], rel=1e-6)


@pytest.mark.parametrize(
    ("field", "value", "error_type"),
    [
        ("rooms", 1.5, "int_type"),
        ("rooms", 2.0, "int_type"),
        ("rooms", True, "int_type"),
        ("rooms", "3", "int_type"),
        ("rooms", 0, "greater_than"),
        ("area", False, "float_type"),
        ("city", "atlantis", "literal_error"),
        ("city", "Paris", "literal_error"),
        ("city", 1, "literal_error"),
    ],
)
def test_strict_kinds_reject_with_a_422_naming_the_field(
    flats: TestClient, field: str, value: Any, error_type: str
) -> None:
    error = _error(flats.post("/predict", json={**VALID, field: value}))
    assert error["loc"] == ["body", field]
    assert error["type"] == error_type


def test_an_unknown_category_error_lists_the_allowed_values(flats: TestClient) -> None:
    error = _error(flats.post("/predict", json={**VALID, "city": "atlantis"}))
    assert all(city in error["msg"] for city in ("paris", "lyon", "nice"))


def test_categories_are_counted_per_value_and_predictions_at_the_target_deciles(
    flats: TestClient,
) -> None:
    rows = [VALID, {**VALID, "city": "paris"}, {**VALID, "city": "paris"}]
    assert flats.post("/predict/batch", json={"instances": rows}).status_code == 200
    assert flats.post("/predict", json=VALID).status_code == 200
    text = flats.get("/metrics").text
    counts = {
        line.split('value="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("model_feature_category_total{") and f'model="{MIXED_NAME}"' in line
    }
    assert counts["paris"] >= 2
    assert counts["lyon"] >= 2
    info = flats.get("/model-info").json()
    assert info["task"] == "regression"
    assert info["class_labels"] is None
    assert info["drift_metrics"]["enabled"] is True
    edges = sorted(set(info["target_statistics"]["deciles"]))
    buckets = [
        line
        for line in text.splitlines()
        if line.startswith("model_prediction_value_bucket{") and f'model="{MIXED_NAME}"' in line
    ]
    assert len(buckets) == len(edges) + 1  # the deciles and +Inf
    (total,) = [float(line.rsplit(" ", 1)[1]) for line in buckets if 'le="+Inf"' in line]
    assert total >= 4  # earlier tests in this process may have predicted too
