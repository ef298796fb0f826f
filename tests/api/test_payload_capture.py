"""Payload capture on every prediction route: one CloudEvent per row, whose id
is the X-Request-ID the answer carried, with the inputs the model saw and
what it answered; never a header or a key."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.auth import keyfile
from service.settings import ServiceSettings
from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA, VIRGINICA
from tests.support.capture import capturing_settings, read_events
from tests.support.user_models import MIXED_NAME, package_mixed_regressor
from tests.support.v2 import HEADER_LENGTH, INFER, ROWS, binary_request, json_request, read_response


def assert_cloud_event(event: dict[str, Any], route: str) -> None:
    assert event["specversion"] == "1.0"
    assert event["type"] == "ml-api.prediction"
    assert event["source"] == route
    assert event["datacontenttype"] == "application/json"
    assert event["time"].endswith("Z")
    assert event["data"]["model"] == {"name": "iris", "version": "1.0.0"}


@pytest.fixture
def payloads(tmp_path: Path) -> Path:
    return tmp_path / "payloads"


def capturing(make_client: ClientFactory, payloads: Path) -> AbstractContextManager[TestClient]:
    """The app capturing every request; its files are complete once it has stopped."""
    return make_client(payload_log_dir=payloads, payload_sample=1.0)


def test_predict_event_carries_the_request_id_inputs_and_answer(
    make_client: ClientFactory, payloads: Path, tmp_path: Path
) -> None:
    keys_file = tmp_path / "api-keys"
    key = keyfile.mint_key()
    keyfile.update(keys_file, add=keyfile.StoredKey("alice", keyfile.digest_of(key)))
    with make_client(
        payload_log_dir=payloads, payload_sample=1.0, api_keys_file=keys_file, auth="keys"
    ) as client:
        response = client.post(
            "/predict",
            json=SETOSA,
            headers={"Authorization": f"Bearer {key}", "X-Custom-Secret": "do-not-log-me"},
        )
        assert response.status_code == 200
    (event,) = read_events(payloads)
    assert_cloud_event(event, "/predict")
    assert event["id"] == response.headers["x-request-id"] == event["requestid"]
    answer = response.json()
    assert event["data"]["inputs"] == SETOSA
    assert event["data"]["outputs"] == {
        "predicted_class": answer["predicted_class"],
        "predicted_class_name": answer["predicted_class_name"],
        "probabilities": answer["probabilities"],
    }
    written = b"".join(path.read_bytes() for path in payloads.iterdir())
    assert key.encode() not in written
    assert b"do-not-log-me" not in written
    assert b"authorization" not in written.lower()


def test_a_client_request_id_is_the_event_id(make_client: ClientFactory, payloads: Path) -> None:
    with capturing(make_client, payloads) as client:
        response = client.post("/predict", json=VIRGINICA, headers={"X-Request-ID": "order-42"})
    assert response.headers["x-request-id"] == "order-42"
    (event,) = read_events(payloads)
    assert event["id"] == "order-42"


def test_batch_writes_one_event_per_row(make_client: ClientFactory, payloads: Path) -> None:
    instances = [SETOSA, VIRGINICA, SETOSA]
    with capturing(make_client, payloads) as client:
        response = client.post("/predict/batch", json={"instances": instances})
    assert response.status_code == 200
    events = read_events(payloads)
    request_id = response.headers["x-request-id"]
    assert [e["id"] for e in events] == [f"{request_id}/{row}" for row in range(3)]
    assert {e["requestid"] for e in events} == {request_id}
    for event, instance, prediction in zip(
        events, instances, response.json()["predictions"], strict=True
    ):
        assert_cloud_event(event, "/predict/batch")
        assert event["data"]["inputs"] == instance
        assert (
            event["data"]["outputs"]["predicted_class_name"] == (prediction["predicted_class_name"])
        )
        assert event["data"]["outputs"]["probabilities"] == prediction["probabilities"]


def test_v2_infer_writes_an_event_per_row_json_and_binary(
    make_client: ClientFactory, payloads: Path
) -> None:
    body, headers = binary_request(ROWS)
    with capturing(make_client, payloads) as client:
        one = client.post(INFER, json=json_request(ROWS[:1]))
        two = client.post(INFER, content=body, headers=headers)
    assert one.status_code == two.status_code == 200
    events = read_events(payloads)
    assert [e["id"] for e in events] == [
        one.headers["x-request-id"],
        f"{two.headers['x-request-id']}/0",
        f"{two.headers['x-request-id']}/1",
    ]
    answered = read_response(two.content, two.headers.get(HEADER_LENGTH))["outputs"]
    for event, row in zip(events, [ROWS[0], ROWS[0], ROWS[1]], strict=True):
        assert_cloud_event(event, INFER)
        # The float32 values the model saw.
        assert list(event["data"]["inputs"].values()) == row.tolist()
    for event, expected in zip(events[1:], answered["probabilities"], strict=True):
        written = list(event["data"]["outputs"]["probabilities"].values())
        assert np.allclose(written, expected, atol=1e-6)


def test_sample_zero_writes_nothing(make_client: ClientFactory, payloads: Path) -> None:
    with make_client(payload_log_dir=payloads, payload_sample=0.0) as client:
        assert client.post("/predict", json=SETOSA).status_code == 200
    assert not payloads.exists()


def test_a_sample_without_a_directory_is_refused() -> None:
    with pytest.raises(ValidationError, match="PAYLOAD_LOG_DIR"):
        ServiceSettings(payload_sample=0.5)


def test_regressor_events_name_categories_and_carry_the_prediction(
    tmp_path: Path, payloads: Path
) -> None:
    model_dir = package_mixed_regressor(tmp_path / "flats")
    settings = capturing_settings(model_dir, payloads, model_name=MIXED_NAME)
    instances = [
        {"rooms": 3, "area": 80.5, "city": "lyon"},
        {"rooms": 5, "area": 120.0, "city": "paris"},
    ]
    with TestClient(create_app(settings)) as client:
        one = client.post("/predict", json=instances[0]).json()
        batch = client.post("/predict/batch", json={"instances": instances}).json()
    events = read_events(payloads)
    assert [e["data"]["inputs"] for e in events] == [instances[0], *instances]
    predictions = [one["prediction"], *(p["prediction"] for p in batch["predictions"])]
    assert [e["data"]["outputs"]["prediction"] for e in events] == pytest.approx(predictions)
