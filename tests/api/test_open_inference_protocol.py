"""The Open Inference Protocol (KServe V2) endpoints, in process, on both backends."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import ServiceSettings
from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA
from tests.support.v2 import (
    FEATURES,
    HEADER_LENGTH,
    INFER,
    ROWS,
    binary_request,
    json_request,
    read_response,
)

CLASSES = ["setosa", "versicolor", "virginica"]


def _error(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str)
    return str(body["error"])


def _infer(client: TestClient, request: dict[str, Any], path: str = INFER) -> dict[str, Any]:
    response = client.post(path, json=request)
    assert response.status_code == 200, response.text
    return read_response(response.content, response.headers.get(HEADER_LENGTH))


@pytest.mark.parametrize("path", ["/v2", "/v2/"])
def test_server_metadata_advertises_the_binary_extension(
    onnx_client: TestClient, path: str
) -> None:
    body = onnx_client.get(path).json()
    assert body["name"] == "ml-api"
    assert isinstance(body["version"], str)
    assert body["extensions"] == ["binary_tensor_data"]


def test_server_is_live_and_ready(onnx_client: TestClient) -> None:
    assert onnx_client.get("/v2/health/live").json() == {"live": True}
    ready = onnx_client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


@pytest.mark.parametrize("path", ["/v2/models/iris", "/v2/models/iris/versions/1.0.0"])
def test_model_metadata_describes_the_tensors_from_the_manifest(
    client: TestClient, path: str
) -> None:
    metadata = client.get(path).json()
    assert metadata["name"] == "iris"
    assert metadata["versions"] == ["1.0.0"]
    assert metadata["platform"] in {"onnx_onnxv1", "sklearn_joblib"}
    assert metadata["inputs"] == [
        {
            "name": "features",
            "datatype": "FP32",
            "shape": [-1, 4],
            "parameters": {"feature_names": FEATURES, "nullable": [False] * 4},
        }
    ]
    assert metadata["outputs"] == [
        {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
        {"name": "predicted_class_name", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert metadata["properties"]["feature_names"] == FEATURES
    assert metadata["properties"]["classes"] == CLASSES


@pytest.mark.parametrize("path", ["/v2/models/iris/ready", "/v2/models/iris/versions/1.0.0/ready"])
def test_the_served_version_is_ready(onnx_client: TestClient, path: str) -> None:
    assert onnx_client.get(path).json() == {"name": "iris", "ready": True}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/wine"),
        ("GET", "/v2/models/wine/ready"),
        ("POST", "/v2/models/wine/infer"),
        ("GET", "/v2/models/iris/versions/2.0.0"),
        ("GET", "/v2/models/iris/versions/2.0.0/ready"),
        ("POST", "/v2/models/iris/versions/1.0.1/infer"),
        ("GET", "/v2/models/iris/versions/1.0.0/infer/more"),
        ("GET", "/v2/repository/index"),
    ],
)
def test_unknown_models_versions_and_endpoints_are_404(
    onnx_client: TestClient, method: str, path: str
) -> None:
    response = onnx_client.request(method, path, json=json_request(ROWS))
    message = _error(response, 404)
    if "/models/wine" in path:
        assert "wine" in message
        assert "iris" in message
    if "/versions/" in path and "infer/more" not in path:
        assert "1.0.0" in message


def test_json_inference_equals_predict_for_the_same_rows(client: TestClient) -> None:
    instances = [dict(zip(FEATURES, row, strict=True)) for row in ROWS.tolist()]
    expected = client.post("/predict/batch", json={"instances": instances}).json()["predictions"]
    response = _infer(client, json_request(ROWS, id="request-7"))
    assert response["model_name"] == "iris"
    assert response["model_version"] == "1.0.0"
    assert response["id"] == "request-7"
    outputs = response["outputs"]
    assert outputs["predicted_class"].tolist() == [p["predicted_class"] for p in expected]
    assert outputs["predicted_class_name"] == [p["predicted_class_name"] for p in expected]
    probabilities = np.array([[p["probabilities"][c] for c in CLASSES] for p in expected])
    np.testing.assert_allclose(outputs["probabilities"], probabilities, atol=1e-6)


def test_nested_data_is_the_same_tensor_as_flat_data(onnx_client: TestClient) -> None:
    flat = _infer(onnx_client, json_request(ROWS))
    nested_request = json_request(ROWS)
    nested_request["inputs"][0]["data"] = ROWS.tolist()
    nested = _infer(onnx_client, nested_request)
    np.testing.assert_array_equal(
        flat["outputs"]["probabilities"], nested["outputs"]["probabilities"]
    )


def test_binary_inputs_and_outputs_match_json(client: TestClient) -> None:
    expected = _infer(client, json_request(ROWS))["outputs"]
    body, headers = binary_request(ROWS, parameters={"binary_data_output": True})
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header = json.loads(response.content[: int(response.headers[HEADER_LENGTH])])
    assert all("data" not in output for output in header["outputs"])
    outputs = read_response(response.content, response.headers[HEADER_LENGTH])["outputs"]
    assert outputs["predicted_class"].tolist() == expected["predicted_class"].tolist()
    assert outputs["predicted_class_name"] == expected["predicted_class_name"]
    np.testing.assert_array_equal(outputs["probabilities"], expected["probabilities"])


@pytest.mark.parametrize("datatype", ["FP64", "INT32", "UINT8", "INT64"])
def test_wider_and_integer_datatypes_are_accepted(onnx_client: TestClient, datatype: str) -> None:
    dtype = {"FP64": np.float64, "INT32": np.int32, "UINT8": np.uint8, "INT64": np.int64}[datatype]
    rows = np.array([[5, 3, 1, 1], [7, 3, 5, 2]], dtype=dtype)
    from_json = _infer(onnx_client, json_request(rows, datatype))["outputs"]
    body, headers = binary_request(rows, datatype)
    response = onnx_client.post(INFER, content=body, headers=headers)
    from_binary = read_response(response.content, response.headers.get(HEADER_LENGTH))["outputs"]
    assert from_json["predicted_class_name"] == from_binary["predicted_class_name"]
    np.testing.assert_array_equal(from_json["probabilities"], from_binary["probabilities"])


def test_outputs_can_be_selected_each_in_json_or_binary(onnx_client: TestClient) -> None:
    request = json_request(
        ROWS,
        outputs=[
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "predicted_class_name"},
        ],
        parameters={"custom": "tolerated", "priority": 1},
    )
    request["inputs"][0]["parameters"] = {"note": "tolerated"}
    response = onnx_client.post(INFER, json=request)
    header = json.loads(response.content[: int(response.headers[HEADER_LENGTH])])
    assert [o["name"] for o in header["outputs"]] == ["probabilities", "predicted_class_name"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 2 * 3 * 4}
    assert header["outputs"][1]["data"] == ["setosa", "virginica"]
    assert "id" not in header


def test_a_named_version_infers_like_the_default(onnx_client: TestClient) -> None:
    versioned = _infer(onnx_client, json_request(ROWS), "/v2/models/iris/versions/1.0.0/infer")
    assert versioned["outputs"]["predicted_class_name"] == ["setosa", "virginica"]


def _declared_shape(shape: list[int]) -> tuple[bytes, dict[str, str]]:
    body, headers = binary_request(ROWS)
    length = int(headers[HEADER_LENGTH])
    header = json.loads(body[:length])
    header["inputs"][0]["shape"] = shape
    encoded = json.dumps(header).encode()
    return encoded + body[length:], {HEADER_LENGTH: str(len(encoded))}


def _nan_rows() -> np.ndarray:
    rows = ROWS.copy()
    rows[1, 2] = np.nan
    return rows


def _inf_rows() -> np.ndarray:
    rows = ROWS.copy()
    rows[0, 3] = np.inf
    return rows


Frame = tuple[bytes, dict[str, str]]


def _truncated() -> Frame:
    body, headers = binary_request(ROWS)
    return body[:-5], headers


def _header_length(value: str) -> Frame:
    body, _ = binary_request(ROWS)
    return body, {HEADER_LENGTH: value}


def _trailing_bytes() -> Frame:
    body, headers = binary_request(ROWS)
    return body + b"\0\0\0\0", headers


BINARY_ERRORS: dict[str, tuple[Any, str]] = {
    "NaN in a binary tensor": (
        lambda: binary_request(_nan_rows()),
        "row 1 feature 'petal_length': NaN",
    ),
    "infinity in a binary tensor": (
        lambda: binary_request(_inf_rows()),
        "row 0 feature 'petal_width': inf",
    ),
    "truncated binary body": (_truncated, "binary_data_size"),
    "header length beyond the body": (
        lambda: _header_length(str(len(_truncated()[0]) + 6)),
        "Inference-Header-Content-Length",
    ),
    "header length not a number": (lambda: _header_length("-3"), "Inference-Header-Content-Length"),
    # More digits than Python's int() takes (4,300): a 500 with a traceback once.
    "header length of 4,301 digits": (
        lambda: _header_length("9" * 4301),
        "Inference-Header-Content-Length",
    ),
    "bytes after the tensors": (_trailing_bytes, "after the binary tensor data"),
    "size not matching the shape": (lambda: _declared_shape([1, 4]), "needs 16"),
}


@pytest.mark.parametrize("case", list(BINARY_ERRORS))
def test_malformed_binary_requests_are_400(onnx_client: TestClient, case: str) -> None:
    build, expected = BINARY_ERRORS[case]
    body, headers = build()
    message = _error(onnx_client.post(INFER, content=body, headers=headers), 400)
    assert expected in message


def _with_input(**changes: Any) -> dict[str, Any]:
    request = json_request(ROWS)
    request["inputs"][0].update(changes)
    return request


JSON_ERRORS: dict[str, tuple[Any, str]] = {
    "FP16": (_with_input(datatype="FP16"), "datatype 'FP16'"),
    "BYTES": (_with_input(datatype="BYTES"), "datatype 'BYTES'"),
    "BOOL": (_with_input(datatype="BOOL"), "datatype 'BOOL'"),
    "unknown datatype": (_with_input(datatype="FLOAT"), "datatype 'FLOAT'"),
    "one dimension": (_with_input(shape=[8]), "shape"),
    "three columns": (_with_input(shape=[2, 3]), "3 columns"),
    "zero rows": (_with_input(shape=[0, 4], data=[]), "1 to 1000 rows"),
    "too many rows": (_with_input(shape=[1001, 4]), "1 to 1000 rows"),
    "negative dimension": (_with_input(shape=[-1, 4]), "shape"),
    "float dimension": (_with_input(shape=[2.0, 4]), "shape"),
    "too few elements": (_with_input(data=ROWS.ravel().tolist()[:7]), "data has 7"),
    "ragged nesting": (_with_input(data=[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0]]), "nested"),
    "boolean element": (_with_input(data=[5.1, True, 1.4, 0.2, *ROWS[1].tolist()]), "boolean"),
    "string element": (_with_input(data=[5.1, "3.5", 1.4, 0.2, *ROWS[1].tolist()]), "string"),
    "null element": (_with_input(data=[5.1, None, 1.4, 0.2, *ROWS[1].tolist()]), "null"),
    "float for INT32": (_with_input(datatype="INT32", data=[5, 3, 1, 1, 7, 3, 5, 2.5]), "integer"),
    "INT8 overflow": (_with_input(datatype="INT8", data=[5, 3, 1, 1, 7, 3, 5, 300]), "INT8"),
    "above a bound": (_with_input(data=[5.1, 3.5, 1.4, 0.2, 6.7, 99.0, 5.2, 2.3]), "row 1"),
    "zero where > 0": (_with_input(data=[0.0, 3.5, 1.4, 0.2, *ROWS[1].tolist()]), "greater than"),
    "float32 overflow": (
        _with_input(datatype="FP64", data=[5.1, 3.5, 1.4, 3.5e38, *ROWS[1].tolist()]),
        "petal_width",
    ),
    "data and binary size": (_with_input(parameters={"binary_data_size": 32}), "both"),
    "no data": ({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32"}]}, "no data"),
    "unknown input": (_with_input(name="input0"), "unknown input 'input0'"),
    "input twice": ({"inputs": json_request(ROWS)["inputs"] * 2}, "twice"),
    "no inputs": ({"inputs": []}, "inputs"),
    "inputs not a list": ({"inputs": {"name": "features"}}, "inputs"),
    "unknown output": (json_request(ROWS, outputs=[{"name": "label"}]), "unknown output 'label'"),
    "output twice": (json_request(ROWS, outputs=[{"name": "probabilities"}] * 2), "twice"),
    "id not a string": (json_request(ROWS, id=42), "id"),
    "binary_data_output not a flag": (
        json_request(ROWS, parameters={"binary_data_output": "yes"}),
        "binary_data_output",
    ),
    "not an object": ([1, 2, 3], "object"),
}


@pytest.mark.parametrize("case", list(JSON_ERRORS))
def test_invalid_requests_are_400_naming_what_is_wrong(onnx_client: TestClient, case: str) -> None:
    request, expected = JSON_ERRORS[case]
    message = _error(onnx_client.post(INFER, json=request), 400)
    assert expected in message, message


def test_out_of_bounds_errors_name_input_row_and_feature(onnx_client: TestClient) -> None:
    request = _with_input(data=[5.1, 3.5, 1.4, 0.2, 6.7, 99.0, 5.2, 2.3])
    message = _error(onnx_client.post(INFER, json=request), 400)
    assert message.startswith("input 'features' row 1 feature 'sepal_width': 99.0")


def test_invalid_json_is_400(onnx_client: TestClient) -> None:
    response = onnx_client.post(
        INFER, content=b'{"inputs": [', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in _error(response, 400)


def test_other_media_types_are_415(onnx_client: TestClient) -> None:
    response = onnx_client.post(INFER, content=b"a=1", headers={"content-type": "text/plain"})
    _error(response, 415)


def test_wrong_method_is_405_with_allow(onnx_client: TestClient) -> None:
    response = onnx_client.get(INFER)
    _error(response, 405)
    assert response.headers["allow"] == "POST"
    assert onnx_client.delete("/v2/models/iris").headers["allow"] == "GET, HEAD"


def test_head_is_get_without_the_body(onnx_client: TestClient) -> None:
    get = onnx_client.get("/v2/models/iris/ready")
    head = onnx_client.head("/v2/models/iris/ready")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == get.headers["content-length"]


def test_body_limit_answers_413_in_the_v2_shape(make_client: ClientFactory) -> None:
    with make_client(max_request_bytes=1024) as client:
        body, headers = binary_request(np.tile(ROWS, (100, 1)))
        _error(client.post(INFER, content=body, headers=headers), 413)


def test_metrics_label_the_route_template_never_the_model_name(onnx_client: TestClient) -> None:
    onnx_client.post("/v2/models/attacker-chosen/infer", json=json_request(ROWS))
    onnx_client.post(INFER, json=json_request(ROWS))
    onnx_client.get("/v2/models/iris/versions/9.9.9/ready")
    samples = [
        sample
        for family in text_string_to_metric_families(onnx_client.get("/metrics").text)
        for sample in family.samples
        if sample.name == "http_requests_total"
    ]
    counted = {(s.labels["handler"], s.labels["status"]) for s in samples}
    assert ("/v2/models/{model_name}/infer", "200") in counted
    assert ("/v2/models/{model_name}/infer", "404") in counted
    assert ("/v2/models/{model_name}/versions/{model_version}/ready", "404") in counted
    for sample in samples:
        assert "attacker" not in sample.labels["handler"]
        assert "9.9.9" not in sample.labels["handler"]


def test_before_the_model_is_loaded_v2_says_not_ready(model_dir: Path) -> None:
    client = TestClient(create_app(ServiceSettings(model_dir=model_dir)))
    assert client.get("/v2/health/live").status_code == 200
    ready = client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (503, {"ready": False})
    assert _error(client.get("/v2/models/iris"), 503) == "model not loaded"
    response = client.post(INFER, json=json_request(ROWS))
    _error(response, 503)
    assert response.headers["retry-after"] == "1"


def test_openapi_documents_every_fast_route_once(onnx_client: TestClient) -> None:
    from service.routes.table import FAST_ROUTES

    document = onnx_client.get("/openapi.json").json()
    for route in FAST_ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        assert operation["summary"] == route.summary
        assert operation["operationId"] == route.operation_id
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert {"200", "400", "404", "413"} <= set(infer["responses"])
    assert infer["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "V2Error"
    )
    example = infer["requestBody"]["content"]["application/json"]["example"]
    assert _infer(onnx_client, example)["id"] == "42"
    assert [(p["name"], p["in"]) for p in infer["parameters"]] == [
        ("model_name", "path"),
        ("Inference-Header-Content-Length", "header"),
    ]
    binary = {"type": "string", "format": "binary"}
    assert infer["requestBody"]["content"]["application/octet-stream"]["schema"] == binary
    assert infer["responses"]["200"]["content"]["application/octet-stream"]["schema"] == binary
    assert set(document["paths"]["/predict"]) == {"post"}


def test_single_row_answers_like_predict(client: TestClient) -> None:
    expected = client.post("/predict", json=SETOSA).json()
    outputs = _infer(client, json_request([list(SETOSA.values())]))["outputs"]
    assert outputs["predicted_class"].tolist() == [expected["predicted_class"]]
    assert outputs["predicted_class_name"] == [expected["predicted_class_name"]]
    np.testing.assert_allclose(
        outputs["probabilities"][0], [expected["probabilities"][c] for c in CLASSES], atol=1e-6
    )


@pytest.mark.parametrize("rows", [1, 16, 17, 100, 1000])
@pytest.mark.parametrize("bad", [np.nan, -np.inf, 0.0, 50.0])
def test_bounds_hold_for_small_and_large_tensors(
    onnx_client: TestClient, rows: int, bad: float
) -> None:
    # Up to 64 elements are checked in Python, more by numpy: the same rules.
    data = np.tile(ROWS[:1], (rows, 1))
    data[rows - 1, 1] = bad
    body, headers = binary_request(data)
    message = _error(onnx_client.post(INFER, content=body, headers=headers), 400)
    assert message.startswith(f"input 'features' row {rows - 1} feature 'sepal_width': ")
    data[rows - 1, 1] = 28.4  # the inclusive maximum itself is valid
    body, headers = binary_request(data)
    assert onnx_client.post(INFER, content=body, headers=headers).status_code == 200


def test_one_json_row_takes_the_row_call_and_answers_and_counts_as_two_rows_do(
    onnx_client: TestClient, row_calls: list[Sequence[float]]
) -> None:
    rng = np.random.default_rng(5)
    rows = rng.uniform(1e-6, 26.0, size=(60, len(FEATURES)))
    before = onnx_client.get("/metrics").text
    for row in rows:
        one = onnx_client.post(INFER, json=json_request([row]))
        two = onnx_client.post(INFER, json=json_request([row, row]))
        assert one.status_code == two.status_code == 200
        first = {o["name"]: o["data"][: len(o["data"]) // 2] for o in two.json()["outputs"]}
        assert {o["name"]: o["data"] for o in one.json()["outputs"]} == first
        assert [o["shape"][0] for o in one.json()["outputs"]] == [1, 1, 1]
    after = onnx_client.get("/metrics").text
    # Only the one-row requests took it (a two-row matrix takes the batch path).
    assert len(row_calls) == len(rows)

    def total(text: str, name: str, **labels: str) -> float:
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    # Both requests of each pair counted, features as the float32 values the model saw.
    assert total(after, "model_predictions_total") - total(before, "model_predictions_total") == (
        3 * len(rows)
    )
    float32 = rows.astype(np.float32).astype(np.float64)
    for column, name in enumerate(FEATURES):
        seen = total(after, "model_feature_value_sum", feature=name) - total(
            before, "model_feature_value_sum", feature=name
        )
        assert seen == pytest.approx(3 * float32[:, column].sum(), rel=1e-12)
