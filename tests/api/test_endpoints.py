"""Health, readiness, model info and the OpenAPI document."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from tests.api.conftest import ClientFactory

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def test_health_reports_the_loaded_model(onnx_client: TestClient) -> None:
    response = onnx_client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "healthy",
        "model_loaded": True,
        "model_version": "1.0.0",
        "auth": "disabled",
    }


def test_liveness_and_readiness_when_loaded(onnx_client: TestClient) -> None:
    assert onnx_client.get("/health/live").json() == {"status": "alive"}
    ready = onnx_client.get("/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_not_ready_and_no_predictions_before_the_model_is_loaded(model_dir: Path) -> None:
    # Without entering the lifespan the model is never loaded.
    client = TestClient(create_app(ServiceSettings(model_dir=model_dir)))
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert (ready.status_code, ready.json()) == (
        503,
        {"status": "not ready", "reason": "no model loaded yet"},
    )
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["model_loaded"] is False
    predict = client.post("/predict", json={})
    assert predict.status_code == 503
    assert predict.headers["retry-after"] == "1"
    assert client.get("/model-info").status_code == 503


def test_model_info_describes_what_is_serving(client: TestClient, bundle_path: Path) -> None:
    info = client.get("/model-info").json()
    assert info["estimator_type"] == "RandomForestClassifier"
    assert info["feature_names"] == FEATURES
    assert info["class_labels"] == ["setosa", "versicolor", "virginica"]
    assert info["version"] == "1.0.0"
    assert info["backend"] in {"onnx", "sklearn"}
    assert info["training_metrics"]["accuracy"] >= 0.9
    assert info["created_at"]
    for name in ("model.joblib", "model.onnx"):
        digest = hashlib.sha256((bundle_path / name).read_bytes()).hexdigest()
        assert info["checksums"][name] == digest


def test_model_info_names_the_backend_requested(make_client: ClientFactory) -> None:
    with make_client(backend="sklearn") as test_client:
        assert test_client.get("/model-info").json()["backend"] == "sklearn"
    with make_client() as test_client:
        assert test_client.get("/model-info").json()["backend"] == "onnx"


def test_openapi_documents_each_feature_with_unit_bounds_and_example(
    onnx_client: TestClient,
) -> None:
    document = onnx_client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    body_ref = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    instance = schemas[body_ref["schema"]["$ref"].rsplit("/", 1)[1]]
    assert list(instance["properties"]) == FEATURES
    assert instance["required"] == FEATURES
    assert instance["additionalProperties"] is False
    petal = instance["properties"]["petal_length"]
    assert petal["type"] == "number"
    assert petal["exclusiveMinimum"] == 0
    assert petal["maximum"] > 6.9
    assert petal["x-unit"] == "cm"
    assert "Petal length" in petal["description"]
    example = instance["examples"][0]
    assert onnx_client.post("/predict", json=example).status_code == 200
    batch_ref = document["paths"]["/predict/batch"]["post"]["requestBody"]["content"]
    assert batch_ref["application/json"]["schema"]["$ref"].endswith("BatchRequest")
    for path in ("/predict", "/predict/batch"):
        assert {"200", "413", "415", "422"} <= set(document["paths"][path]["post"]["responses"])


def test_docs_page_is_served(onnx_client: TestClient) -> None:
    response = onnx_client.get("/docs")
    assert response.status_code == 200
    assert "swagger" in response.text.lower()
