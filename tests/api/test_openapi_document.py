"""The OpenAPI document a client generator reads: chosen operationIds, a named
schema for every status of every route, and bodies that match those schemas."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from service.routes.table import FAST_ROUTES

OPERATION_IDS = {
    ("get", "/health"): "get_health",
    ("get", "/health/live"): "get_liveness",
    ("get", "/health/ready"): "get_readiness",
    ("get", "/model-info"): "get_model_info",
    ("get", "/metrics"): "get_metrics",
    **{(route.method.lower(), route.path): route.operation_id for route in FAST_ROUTES},
}


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def test_every_operation_has_its_chosen_id(onnx_client: TestClient) -> None:
    operations = _operations(onnx_client.get("/openapi.json").json())
    assert {key: op["operationId"] for key, op in operations.items()} == OPERATION_IDS
    assert OPERATION_IDS[("post", "/predict")] == "predict"
    assert OPERATION_IDS[("post", "/v2/models/{model_name}/infer")] == "v2_infer"
    assert len(set(OPERATION_IDS.values())) == len(OPERATION_IDS)


def test_every_status_of_every_route_has_a_named_schema(onnx_client: TestClient) -> None:
    """Named: a generator makes one class of each, with the name it has here.
    Errors in each protocol's one shape (health routes answer 503 in their own)."""
    document = onnx_client.get("/openapi.json").json()
    for (method, path), operation in _operations(document).items():
        for status, response in operation["responses"].items():
            content = response["content"]
            if path == "/metrics":
                assert content == {"text/plain": {"schema": {"type": "string"}}}
                continue
            schema = content["application/json"]["schema"]
            assert set(schema) == {"$ref"}, (method, path, status)
            name = schema["$ref"].rsplit("/", 1)[1]
            assert name in document["components"]["schemas"]
            if status != "200" and not path.startswith("/health"):
                expected = "V2Error" if path.startswith("/v2") else "ErrorResponse"
                if status == "422":
                    expected = "ValidationErrorResponse"
                assert name == expected, (method, path, status)


def test_probabilities_are_one_shared_schema(onnx_client: TestClient) -> None:
    schemas = onnx_client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("Prediction", "PredictionResponse"):
        assert schemas[name]["properties"]["probabilities"] == {
            "$ref": "#/components/schemas/ClassProbabilities"
        }
    assert schemas["ErrorResponse"]["properties"]["detail"] == {
        "type": "string",
        "title": "Detail",
    }
    assert "ctx" in schemas["ErrorItem"]["properties"]


def _validate(document: dict[str, Any], name: str, body: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    Draft202012Validator(schema).validate(body)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/health", "Health"),
        ("/health/live", "Liveness"),
        ("/health/ready", "Readiness"),
        ("/model-info", "ModelInfo"),
    ],
)
def test_the_answers_match_their_documented_schemas(
    client: TestClient, path: str, name: str
) -> None:
    document = client.get("/openapi.json").json()
    response = client.get(path)
    assert response.status_code == 200
    _validate(document, name, response.json())


def test_a_422_matches_its_documented_schema(onnx_client: TestClient) -> None:
    document = onnx_client.get("/openapi.json").json()
    response = onnx_client.post("/predict/batch", json={"instances": [{"x": 1}] * 200})
    assert response.status_code == 422
    _validate(document, "ValidationErrorResponse", response.json())
    assert response.json()["detail"][-1]["type"] == "too_many_errors"
