"""Every way a body can be wrong gets a 4xx JSON body naming the field and the reason."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA

FLOAT32_OVERFLOW = 3.5e38


def _errors(response: Any) -> list[dict[str, Any]]:
    body = response.json()
    assert isinstance(body["detail"], list), body
    assert body["request_id"] == response.headers["x-request-id"]
    return body["detail"]


def _single_error(response: Any, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    errors = _errors(response)
    assert len(errors) == 1, errors
    return errors[0]


def _post_raw(client: TestClient, path: str, body: bytes) -> Any:
    return client.post(path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_numbers(client: TestClient, value: bool) -> None:
    error = _single_error(client.post("/predict", json={**SETOSA, "sepal_width": value}))
    assert error["loc"] == ["body", "sepal_width"]
    assert error["type"] == "float_type"


@pytest.mark.parametrize(
    "literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b"9" * 400]
)
def test_non_finite_and_overflowing_literals_are_rejected(
    client: TestClient, literal: bytes
) -> None:
    body = (
        b'{"sepal_length":5.1,"sepal_width":3.5,"petal_length":1.4,"petal_width":' + literal + b"}"
    )
    error = _single_error(_post_raw(client, "/predict", body))
    assert error["loc"] == ["body", "petal_width"]
    assert error["type"] in {"finite_number", "less_than_equal"}


@pytest.mark.parametrize("value", ["5.1", None, [5.1], {"v": 5.1}])
def test_non_numeric_values_are_rejected(client: TestClient, value: Any) -> None:
    error = _single_error(client.post("/predict", json={**SETOSA, "sepal_length": value}))
    assert error["loc"] == ["body", "sepal_length"]
    assert error["type"] == "float_type"


def test_values_beyond_float32_are_rejected(onnx_client: TestClient) -> None:
    body = {**SETOSA, "sepal_length": FLOAT32_OVERFLOW}
    error = _single_error(onnx_client.post("/predict", json=body))
    assert error["loc"] == ["body", "sepal_length"]
    assert error["type"] == "less_than_equal"


@pytest.mark.parametrize(
    ("value", "error_type"),
    [(0.0, "greater_than"), (-1.0, "greater_than"), (1000.0, "less_than_equal")],
)
def test_values_outside_feature_bounds_are_rejected(
    client: TestClient, value: float, error_type: str
) -> None:
    error = _single_error(client.post("/predict", json={**SETOSA, "petal_length": value}))
    assert error["loc"] == ["body", "petal_length"]
    assert error["type"] == error_type
    assert "Input should be" in error["msg"]


def test_unknown_fields_are_rejected(client: TestClient) -> None:
    error = _single_error(client.post("/predict", json={**SETOSA, "colour": 1.0}))
    assert error["loc"] == ["body", "colour"]
    assert error["type"] == "extra_forbidden"


def test_missing_field_names_itself(client: TestClient) -> None:
    body = {k: v for k, v in SETOSA.items() if k != "petal_width"}
    error = _single_error(client.post("/predict", json=body))
    assert error["loc"] == ["body", "petal_width"]
    assert error["type"] == "missing"


def test_every_wrong_field_is_reported(client: TestClient) -> None:
    response = client.post("/predict", json={"sepal_length": True, "petal_width": -1, "x": 1})
    assert response.status_code == 422
    locations = {tuple(e["loc"]) for e in _errors(response)}
    assert locations == {
        ("body", "sepal_length"),
        ("body", "sepal_width"),
        ("body", "petal_length"),
        ("body", "petal_width"),
        ("body", "x"),
    }


@pytest.mark.parametrize(
    "body", [b"", b"{", b"not json", b"\xff\xfe\x00", b'{"a":1,}', b"[" * 5000 + b"]" * 5000]
)
def test_malformed_json_is_a_422(client: TestClient, body: bytes) -> None:
    error = _single_error(_post_raw(client, "/predict", body))
    assert error["loc"] == ["body"]
    assert error["type"] == "json_invalid"


@pytest.mark.parametrize("body", [b"[]", b"1", b'"text"', b"null", b"[1,2,3,4]"])
def test_non_object_json_is_a_422(client: TestClient, body: bytes) -> None:
    error = _single_error(_post_raw(client, "/predict", body))
    assert error["loc"] == ["body"]
    assert error["type"] == "model_type"


def test_non_json_content_type_is_a_415(client: TestClient) -> None:
    response = client.post(
        "/predict",
        content=b"sepal_length=5.1",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


def test_bad_batch_row_names_its_index(client: TestClient) -> None:
    rows = [SETOSA, SETOSA, {**SETOSA, "sepal_width": "wide"}, SETOSA]
    error = _single_error(client.post("/predict/batch", json={"instances": rows}))
    assert error["loc"] == ["body", "instances", 2, "sepal_width"]


def test_batch_rejects_an_empty_list(client: TestClient) -> None:
    error = _single_error(client.post("/predict/batch", json={"instances": []}))
    assert error["loc"] == ["body", "instances"]
    assert error["type"] == "too_short"


def test_batch_rejects_more_than_max_batch_size_rows(make_client: ClientFactory) -> None:
    with make_client(max_batch_size=5) as test_client:
        error = _single_error(test_client.post("/predict/batch", json={"instances": [SETOSA] * 6}))
    assert error["loc"] == ["body", "instances"]
    assert error["type"] == "too_long"
    assert "5" in error["msg"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"instances": SETOSA},
        {"instances": [SETOSA], "extra": 1},
        {"rows": [SETOSA]},
        {"instances": [[5.1, 3.5, 1.4, 0.2]]},
    ],
)
def test_batch_envelope_is_strict(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/predict/batch", json=body)
    assert response.status_code == 422
    assert _errors(response)


def test_body_over_the_limit_is_a_413_before_it_is_read(make_client: ClientFactory) -> None:
    with make_client(max_request_bytes=2048) as test_client:
        response = _post_raw(test_client, "/predict/batch", b" " * 4096)
    assert response.status_code == 413
    assert "2048" in response.json()["detail"]


def test_chunked_body_over_the_limit_is_cut_off_with_a_413(make_client: ClientFactory) -> None:
    def chunks() -> Any:
        for _ in range(64):  # 64 KiB in all, without a Content-Length
            yield b" " * 1024

    with make_client(max_request_bytes=4096) as test_client:
        response = test_client.post(
            "/predict/batch", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert response.json()["request_id"]


def test_body_just_under_the_limit_is_served(make_client: ClientFactory) -> None:
    import json

    payload = json.dumps({"instances": [SETOSA] * 20}).encode()
    with make_client(max_request_bytes=len(payload)) as test_client:
        assert _post_raw(test_client, "/predict/batch", payload).status_code == 200
