"""GET /metrics in one process: what each request and prediction records."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA, VIRGINICA

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_requests_are_counted_by_route_template_and_status(onnx_client: TestClient) -> None:
    before = _samples(onnx_client)
    for _ in range(3):
        onnx_client.post("/predict", json=SETOSA)
    onnx_client.post("/predict", json={})
    onnx_client.get("/definitely/not/here")
    onnx_client.get("/metrics")
    after = _samples(onnx_client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("http_requests_total", method="POST", handler="/predict", status="200") == 3
    assert delta("http_requests_total", method="POST", handler="/predict", status="422") == 1
    assert delta("http_requests_total", method="GET", handler="none", status="404") == 1
    assert delta("http_request_duration_seconds_count", method="POST", handler="/predict") == 4
    assert not any(dict(labels).get("handler") == "/metrics" for _, labels in after)
    assert not any("not/here" in value for _, labels in after for _, value in labels)


def test_predictions_are_counted_by_class_with_model_labels(onnx_client: TestClient) -> None:
    labels = {"model": "iris", "version": "1.0.0"}
    before = _samples(onnx_client)
    onnx_client.post("/predict/batch", json={"instances": [SETOSA, VIRGINICA, VIRGINICA]})
    after = _samples(onnx_client)
    for name, expected in (("setosa", 1), ("virginica", 2)):
        key = ("model_predictions_total", frozenset({**labels, "class": name}.items()))
        assert after[key] - before.get(key, 0) == expected
    rows_key = ("model_batch_rows_sum", frozenset(labels.items()))
    assert after[rows_key] - before.get(rows_key, 0) == 3
    inference = (
        "model_inference_duration_seconds_count",
        frozenset({**labels, "backend": "onnx"}.items()),
    )
    assert after[inference] - before.get(inference, 0) == 1


def test_single_row_predictions_are_counted_by_class_and_observed(
    onnx_client: TestClient,
) -> None:
    labels = {"model": "iris", "version": "1.0.0"}
    before = _samples(onnx_client)
    for row in (SETOSA, VIRGINICA, VIRGINICA):
        assert onnx_client.post("/predict", json=row).status_code == 200
    after = _samples(onnx_client)

    def delta(name: str, **more: str) -> float:
        return _value(after, name, **labels, **more) - _value(before, name, **labels, **more)

    assert delta("model_predictions_total", **{"class": "setosa"}) == 1
    assert delta("model_predictions_total", **{"class": "virginica"}) == 2
    assert delta("model_inference_duration_seconds_count", backend="onnx") == 3
    assert delta("model_batch_rows_sum") == 3
    for feature in SETOSA:
        assert delta("model_feature_value_count", feature=feature) == 3
        expected = SETOSA[feature] + 2 * VIRGINICA[feature]
        assert abs(delta("model_feature_value_sum", feature=feature) - expected) < 1e-9


def test_feature_histograms_use_the_training_deciles(onnx_client: TestClient) -> None:
    info = onnx_client.get("/model-info").json()
    deciles = next(f["deciles"] for f in info["features"] if f["name"] == "petal_length")
    onnx_client.post("/predict", json=SETOSA)
    samples = _samples(onnx_client)
    edges = sorted(
        float(dict(labels)["le"])
        for name, labels in samples
        if name == "model_feature_value_bucket" and dict(labels).get("feature") == "petal_length"
    )
    assert edges == [*sorted(set(deciles)), float("inf")]


def test_model_info_names_the_bundle_and_checksum(make_client: ClientFactory) -> None:
    with make_client(backend="sklearn") as client:
        checksum = client.get("/model-info").json()["checksums"]["model.joblib"]
        samples = _samples(client)
    key = (
        "model_info",
        frozenset(
            {"model": "iris", "version": "1.0.0", "backend": "sklearn", "sha256": checksum}.items()
        ),
    )
    assert samples[key] == 1


def test_worker_process_metrics_are_reported(onnx_client: TestClient) -> None:
    samples = _samples(onnx_client)
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds"):
        values = [v for (n, _), v in samples.items() if n == name]
        assert values, name
        assert all(v > 0 for v in values), name


def test_metrics_can_be_turned_off(make_client: ClientFactory) -> None:
    with make_client(metrics_enabled=False) as client:
        assert client.get("/metrics").status_code == 404
        assert client.post("/predict", json=SETOSA).status_code == 200
