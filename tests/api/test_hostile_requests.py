"""Requests crafted to hurt: bounded answers, no redirects to a client-chosen host."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.api.conftest import ClientFactory
from tests.unit.test_error_cap import unknown_keys_body

MIB = 1024 * 1024


def test_a_mebibyte_of_unknown_keys_gets_a_small_422(onnx_client: TestClient) -> None:
    body = unknown_keys_body(MIB - 1024)
    response = onnx_client.post(
        "/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert len(response.content) < 16 * 1024
    payload = response.json()
    assert set(payload) == {"detail", "request_id"}
    assert len(payload["detail"]) == 21
    assert payload["detail"][-1]["ctx"]["error_count"] == body.count(b":") + 4


def test_a_trailing_slash_with_a_foreign_host_is_a_404_not_a_redirect(
    onnx_client: TestClient,
) -> None:
    for method, path in (("POST", "/predict/"), ("POST", "/predict/batch/"), ("GET", "/health/")):
        response = onnx_client.request(
            method, path, headers={"host": "evil.example"}, json={}, follow_redirects=False
        )
        assert response.status_code == 404, (method, path)
        assert "location" not in response.headers


def test_an_unloadable_bundle_leaves_the_app_up_and_not_ready(
    make_client: ClientFactory, model_dir: Path
) -> None:
    (model_dir / "iris" / "1.0.0" / "model.onnx").write_bytes(b"gone bad")
    with make_client() as client:
        assert client.get("/health/live").status_code == 200
        assert client.get("/health/ready").status_code == 503
        predict = client.post("/predict", json={})
        assert (predict.status_code, predict.headers["retry-after"]) == (503, "1")


def test_model_info_has_no_rollout_outside_gunicorn(onnx_client: TestClient) -> None:
    info = onnx_client.get("/model-info").json()
    assert info["rollout"] is None
    assert len(info["manifest_sha256"]) == 64
