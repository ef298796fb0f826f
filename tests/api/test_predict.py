"""POST /predict and /predict/batch: correct answers from both backends."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA, VIRGINICA

CLASSES = ["setosa", "versicolor", "virginica"]


def test_predict_returns_setosa_for_the_readme_example(client: TestClient) -> None:
    response = client.post("/predict", json=SETOSA)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "predicted_class",
        "predicted_class_name",
        "confidence",
        "probabilities",
        "model_version",
    }
    assert body["predicted_class"] == 0
    assert body["predicted_class_name"] == "setosa"
    assert body["model_version"] == "1.0.0"
    assert list(body["probabilities"]) == CLASSES
    assert math.isclose(sum(body["probabilities"].values()), 1.0, abs_tol=1e-5)
    assert body["confidence"] == max(body["probabilities"].values())


def test_predict_returns_virginica_for_a_virginica_row(client: TestClient) -> None:
    body = client.post("/predict", json=VIRGINICA).json()
    assert (body["predicted_class"], body["predicted_class_name"]) == (2, "virginica")


def test_backends_agree_on_probabilities(make_client: ClientFactory) -> None:
    rows = [SETOSA, VIRGINICA, {**SETOSA, "petal_length": 4.5, "petal_width": 1.5}]
    answers = {}
    for backend in ("onnx", "sklearn"):
        with make_client(backend=backend) as test_client:
            answers[backend] = test_client.post("/predict/batch", json={"instances": rows}).json()[
                "predictions"
            ]
    for onnx_row, sklearn_row in zip(answers["onnx"], answers["sklearn"], strict=True):
        assert onnx_row["predicted_class"] == sklearn_row["predicted_class"]
        for name in CLASSES:
            assert math.isclose(
                onnx_row["probabilities"][name], sklearn_row["probabilities"][name], abs_tol=1e-5
            )


def test_batch_answers_each_row_in_order(client: TestClient) -> None:
    response = client.post("/predict/batch", json={"instances": [SETOSA, VIRGINICA, SETOSA]})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "1.0.0"
    assert [p["predicted_class_name"] for p in body["predictions"]] == [
        "setosa",
        "virginica",
        "setosa",
    ]
    single = client.post("/predict", json=VIRGINICA).json()
    assert body["predictions"][1]["probabilities"] == single["probabilities"]
    assert "model_version" not in body["predictions"][0]


def test_batch_accepts_exactly_max_batch_size_rows(make_client: ClientFactory) -> None:
    with make_client(max_batch_size=5) as test_client:
        response = test_client.post("/predict/batch", json={"instances": [SETOSA] * 5})
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 5


def test_large_batches_run_off_the_event_loop_and_still_answer(make_client: ClientFactory) -> None:
    with make_client(max_batch_size=1000) as test_client:
        inline_rows = test_client.app.state.pipeline.predictor.inline_max_rows  # type: ignore[attr-defined]
        rows = [SETOSA, VIRGINICA] * 500
        response = test_client.post("/predict/batch", json={"instances": rows})
    assert inline_rows < 1000
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 1000


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_predict_accepts_json_content_types(onnx_client: TestClient, content_type: str) -> None:
    response = onnx_client.post(
        "/predict",
        content=b'{"sepal_length":5.1,"sepal_width":3.5,"petal_length":1.4,"petal_width":0.2}',
        headers={"content-type": content_type},
    )
    assert response.status_code == 200


def test_response_carries_the_request_id_given(onnx_client: TestClient) -> None:
    response = onnx_client.post("/predict", json=SETOSA, headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_unsafe_request_ids_are_replaced(onnx_client: TestClient) -> None:
    response = onnx_client.post("/predict", json=SETOSA, headers={"x-request-id": "a b\tc<"})
    assert response.headers["x-request-id"] != "a b\tc<"
    assert len(response.headers["x-request-id"]) == 32


def test_a_single_row_answers_exactly_as_the_same_row_in_a_batch(
    onnx_client: TestClient, row_calls: list[Sequence[float]]
) -> None:
    # /predict answers a classifier's row in plain Python end to end; a
    # two-row batch takes numpy's path. Rows anywhere the schema allows
    # (0 < value <= ten times the training maximum), tiny values included.
    rng = random.Random(11)
    for _ in range(200):
        row = {name: rng.choice([rng.uniform(1e-9, 8), rng.uniform(8, 26)]) for name in SETOSA}
        single = onnx_client.post("/predict", json=row).json()
        batched, _ = onnx_client.post("/predict/batch", json={"instances": [row, row]}).json()[
            "predictions"
        ]
        assert single.pop("model_version") == "1.0.0"
        assert single == batched
    assert len(row_calls) == 200


def test_a_row_too_slow_for_the_event_loop_is_not_run_on_it(
    make_client: ClientFactory, row_calls: list[Sequence[float]]
) -> None:
    # A model measured slower than the inline budget at load answers from a
    # thread: the plain-Python row call, which runs on the loop, must step aside.
    with make_client() as client:
        expected = client.post("/predict", json=VIRGINICA).json()
        assert len(row_calls) == 1
        app: Any = client.app
        app.state.pipeline.predictor.inline_max_rows = 0
        assert client.post("/predict", json=VIRGINICA).json() == expected
    assert len(row_calls) == 1
