"""No input, however malformed, reaches the 500 path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.settings import ServiceSettings
from service.v2.tensors import bytes_tensor_binary
from tests.support.bundles import SETOSA, pinned_digests
from tests.support.user_models import CITIES, MIXED_NAME, package_mixed_regressor
from tests.support.v2 import HEADER_LENGTH, INFER

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=15), children, max_size=6)
    ),
    max_leaves=30,
)
feature_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.just(1e39),
    st.just(-0.0),
)
nearly_valid_rows = st.fixed_dictionaries(
    {name: feature_values for name in SETOSA},
    optional={"extra": feature_values},
)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _assert_client_error_or_ok(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.headers.get(HEADER_LENGTH) is not None:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        return
    assert response.headers["content-type"].startswith("application/json")
    if response.status_code >= 400:
        body = response.json()
        assert body["error"] if response.request.url.path.startswith("/v2") else body["detail"]


@FUZZ
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes_never_cause_a_server_error(onnx_client: TestClient, body: bytes) -> None:
    for path in ("/predict", "/predict/batch"):
        _assert_client_error_or_ok(
            onnx_client.post(path, content=body, headers={"content-type": "application/json"})
        )


@FUZZ
@given(value=json_values)
def test_arbitrary_json_never_causes_a_server_error(onnx_client: TestClient, value: Any) -> None:
    body = json.dumps(value).encode()
    for path in ("/predict", "/predict/batch"):
        _assert_client_error_or_ok(
            onnx_client.post(path, content=body, headers={"content-type": "application/json"})
        )


@FUZZ
@given(rows=st.lists(nearly_valid_rows, min_size=1, max_size=4))
def test_nearly_valid_rows_never_cause_a_server_error(
    onnx_client: TestClient, rows: list[dict[str, Any]]
) -> None:
    # json.dumps writes NaN/Infinity literals, which some clients send.
    _assert_client_error_or_ok(
        onnx_client.post(
            "/predict",
            content=json.dumps(rows[0]).encode(),
            headers={"content-type": "application/json"},
        )
    )
    _assert_client_error_or_ok(
        onnx_client.post(
            "/predict/batch",
            content=json.dumps({"instances": rows}).encode(),
            headers={"content-type": "application/json"},
        )
    )


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize(
    "path",
    [
        "/predict",
        "/predict/batch",
        "/nope",
        "/health/../predict",
        "/%ff",
        "/model-info?x=1",
        "/v2",
        "/v2/models/iris/infer",
        "/v2/models/%ff/ready",
        "/v2/models//infer",
    ],
)
def test_wrong_methods_and_paths_are_client_errors(
    onnx_client: TestClient, method: str, path: str
) -> None:
    _assert_client_error_or_ok(onnx_client.request(method, path))


def test_both_backends_survive_the_nearly_valid_corpus(client: TestClient) -> None:
    corpus = [{**SETOSA, "sepal_length": v} for v in (1e-45, 5e-324, 3.4028234e38, 43.9, 1e-300)]
    for row in corpus:
        _assert_client_error_or_ok(client.post("/predict", json=row))
    _assert_client_error_or_ok(client.post("/predict/batch", json={"instances": corpus}))


def test_a_bug_still_answers_json_500_with_the_request_id(
    onnx_client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Only a bug reaches this path; simulate one inside the prediction pipeline.
    pipeline = onnx_client.app.state.pipeline  # type: ignore[attr-defined]

    def broken(*row: object) -> None:
        raise RuntimeError("simulated bug")

    # The route's first call for a single row (the one-row matrix takes what it declines).
    monkeypatch.setattr(pipeline, "run_row_inline", broken)
    response = onnx_client.post("/predict", json=SETOSA, headers={"x-request-id": "bug-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error", "request_id": "bug-1"}
    (record,) = [r for r in caplog.records if r.getMessage() == "unhandled exception"]
    assert record.fields["request_id"] == "bug-1"  # type: ignore[attr-defined]
    assert "simulated bug" in str(record.exc_info)


V2_DATATYPES = ["FP32", "FP64", "INT8", "INT32", "UINT64", "FP16", "BOOL", "BYTES", "?"]
DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT32": "<i4", "UINT64": "<u8"}
tensor_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(min_value=0.1, max_value=20),
    st.integers(min_value=-(2**70), max_value=2**70),
)
shapes = st.one_of(
    st.tuples(st.integers(0, 3), st.integers(0, 5)).map(list),
    st.lists(st.integers(-2, 5), max_size=3),
    json_values,
)
v2_inputs = st.fixed_dictionaries(
    {"name": st.sampled_from(["features", "other", ""]) | json_values, "shape": shapes},
    optional={
        "datatype": st.sampled_from(V2_DATATYPES) | json_values,
        "data": st.lists(tensor_values, max_size=12) | json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": json_values}),
    },
)
v2_requests = st.fixed_dictionaries(
    {"inputs": st.lists(v2_inputs, max_size=2) | json_values},
    optional={
        "id": json_values,
        "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "x"]), json_values),
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["probabilities", "predicted_class", "nope"])},
                optional={"parameters": st.fixed_dictionaries({"binary_data": json_values})},
            ),
            max_size=3,
        )
        | json_values,
    },
)


@FUZZ
@given(request=v2_requests)
def test_arbitrary_v2_requests_never_cause_a_server_error(
    onnx_client: TestClient, request: dict[str, Any]
) -> None:
    _assert_client_error_or_ok(onnx_client.post(INFER, content=json.dumps(request).encode()))


def _raw(values: list[float], dtype: str) -> bytes:
    with np.errstate(all="ignore"):  # NaN and overflow casts are what this fuzzes
        return np.array(values, dtype=np.float64).astype(dtype).tobytes()


@st.composite
def binary_frames(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request, valid or broken anywhere: sizes, shapes, header length, bytes."""
    rows = draw(st.integers(0, 4))
    columns = draw(st.sampled_from([4, 4, 4, 3, 5]))
    datatype = draw(st.sampled_from([*DTYPES, "FP16", "BYTES"]))
    itemsize = np.dtype(DTYPES.get(datatype, "<f4")).itemsize
    true_size = rows * columns * itemsize
    payload = draw(
        st.binary(min_size=true_size, max_size=true_size)
        | st.binary(max_size=true_size + 8)
        | st.lists(tensor_values, min_size=rows * columns, max_size=rows * columns).map(
            lambda values: _raw(values, DTYPES.get(datatype, "<f4"))
        )
    )
    declared = draw(st.just(len(payload)) | st.integers(-2, true_size + 8) | json_values)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [rows, columns],
                    "datatype": datatype,
                    "parameters": {"binary_data_size": declared},
                }
            ],
            "parameters": {"binary_data_output": draw(st.booleans())},
        }
    ).encode()
    length: Any = draw(
        st.just(len(header))
        | st.integers(-1, len(header) + len(payload) + 2)
        | st.text(alphabet="0123456789 +-x.", max_size=4)
    )
    return header + payload, {HEADER_LENGTH: str(length)}


@FUZZ
@given(frame=binary_frames())
def test_arbitrary_binary_frames_never_cause_a_server_error(
    onnx_client: TestClient, frame: tuple[bytes, dict[str, str]]
) -> None:
    body, headers = frame
    for content_type in ("application/octet-stream", None):
        extra = {"content-type": content_type} if content_type else {}
        _assert_client_error_or_ok(onnx_client.post(INFER, content=body, headers=headers | extra))


@FUZZ
@given(body=st.binary(max_size=300), length=st.integers(0, 320))
def test_arbitrary_bytes_with_a_header_length_never_cause_a_server_error(
    onnx_client: TestClient, body: bytes, length: int
) -> None:
    _assert_client_error_or_ok(
        onnx_client.post(INFER, content=body, headers={HEADER_LENGTH: str(length)})
    )


@pytest.fixture(scope="module")
def mixed_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_mixed_regressor(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(params=["onnx", "sklearn"])
def mixed_client(request: pytest.FixtureRequest, mixed_model_dir: Path) -> Iterator[TestClient]:
    """A regressor with integer, number and category features, on each backend."""
    settings = ServiceSettings(
        model_dir=mixed_model_dir,
        model_name=MIXED_NAME,
        backend=request.param,
        trusted_model_sha256=pinned_digests(mixed_model_dir),
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


category_values = st.one_of(st.sampled_from(CITIES), feature_values, st.just("PARIS"))
nearly_valid_mixed_rows = st.fixed_dictionaries(
    {"rooms": feature_values, "area": feature_values, "city": category_values},
    optional={"extra": feature_values},
)


@FUZZ
@given(rows=st.lists(nearly_valid_mixed_rows, min_size=1, max_size=4))
def test_nearly_valid_rows_of_every_feature_kind_never_cause_a_server_error(
    mixed_client: TestClient, rows: list[dict[str, Any]]
) -> None:
    single = mixed_client.post(
        "/predict",
        content=json.dumps(rows[0]).encode(),
        headers={"content-type": "application/json"},
    )
    _assert_client_error_or_ok(single)
    if single.status_code == 200:
        assert set(single.json()) == {"prediction", "model_version"}
    _assert_client_error_or_ok(
        mixed_client.post(
            "/predict/batch",
            content=json.dumps({"instances": rows}).encode(),
            headers={"content-type": "application/json"},
        )
    )


MIXED_INFER = f"/v2/models/{MIXED_NAME}/infer"
city_elements = st.one_of(
    st.sampled_from(CITIES), st.text(max_size=8), feature_values, st.lists(st.sampled_from(CITIES))
)
# (rooms, area) rows within the manifest's bounds.
valid_numbers = st.tuples(st.integers(1, 67), st.floats(0.5, 1993.0))
# Which part of the request a draw breaks: none (a valid request) or one.
BREAKABLE = ["none", "none", "numbers", "shape", "datatype", "data", "inputs", "rows"]


@st.composite
def mixed_v2_requests(draw: st.DrawFn) -> dict[str, Any]:
    """The mixed model's two inputs (FP32 matrix, BYTES cities), valid or broken in one place."""
    broken = draw(st.sampled_from(BREAKABLE))
    rows = draw(st.integers(1, 4))
    valid_rows = draw(st.lists(valid_numbers, min_size=rows, max_size=rows))
    numbers = {
        "name": "features",
        "shape": [rows, 2],
        "datatype": draw(st.sampled_from(["FP32", "FP64"])),
        "data": [value for row in valid_rows for value in row],
    }
    if broken == "numbers":
        numbers["datatype"] = draw(st.sampled_from(["FP32", "FP64", "INT32", "BYTES"]))
        numbers["data"] = draw(
            st.one_of(st.lists(tensor_values, min_size=rows * 2, max_size=rows * 2), json_values)
        )
    city_rows = draw(st.integers(0, 5)) if broken == "rows" else rows
    nested = draw(st.booleans())
    cities: Any = draw(st.lists(st.sampled_from(CITIES), min_size=city_rows, max_size=city_rows))
    if broken == "data":
        cities = draw(st.lists(city_elements, min_size=city_rows, max_size=city_rows) | json_values)
    city = {
        "name": "city",
        "shape": [city_rows, 1] if nested else [city_rows],
        "datatype": "BYTES",
        "data": [[c] for c in cities] if nested and isinstance(cities, list) else cities,
    }
    if broken == "shape":
        city["shape"] = draw(shapes)
    if broken == "datatype":
        city["datatype"] = draw(st.sampled_from(V2_DATATYPES) | json_values)
    inputs = draw(st.sampled_from([[numbers, city], [city, numbers]]))
    if broken == "inputs":
        city["name"] = draw(st.sampled_from(["city", "features", "town"]))
        inputs = draw(st.sampled_from([[city], [numbers], [numbers, city, city]]))
    return {"inputs": inputs}


@st.composite
def mixed_binary_frames(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """Both inputs as binary data, with the BYTES tensor valid or broken in one place."""
    broken = draw(st.sampled_from(BREAKABLE))
    rows = draw(st.integers(1, 4))
    valid_rows = draw(st.lists(valid_numbers, min_size=rows, max_size=rows))
    raw_numbers = np.asarray(valid_rows, dtype="<f4").tobytes()
    if broken == "numbers":
        raw_numbers = _raw(
            draw(st.lists(tensor_values, min_size=rows * 2, max_size=rows * 2)), "<f4"
        )
    city_rows = draw(st.integers(0, 5)) if broken == "rows" else rows
    element = st.sampled_from(CITIES).map(str.encode)
    if broken == "data":
        element = element | st.binary(max_size=8)
    cities = draw(st.lists(element, min_size=city_rows, max_size=city_rows))
    raw_cities = bytes_tensor_binary(cities)
    declared: Any = len(raw_cities)
    if broken == "inputs":
        raw_cities = draw(st.binary(max_size=40))
        declared = draw(
            st.just(len(raw_cities)) | st.integers(-2, len(raw_cities) + 8) | json_values
        )
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [rows, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw_numbers)},
                },
                {
                    "name": "city",
                    "shape": draw(shapes) if broken == "shape" else [city_rows],
                    "datatype": draw(st.sampled_from(V2_DATATYPES))
                    if broken == "datatype"
                    else "BYTES",
                    "parameters": {"binary_data_size": declared},
                },
            ],
            "parameters": {"binary_data_output": draw(st.booleans())},
        }
    ).encode()
    return header + raw_numbers + raw_cities, {HEADER_LENGTH: str(len(header))}


def _assert_a_prediction_or_client_error(response: Any) -> None:
    _assert_client_error_or_ok(response)
    if response.status_code == 200:
        length = int(response.headers.get(HEADER_LENGTH, len(response.content)))
        (output,) = json.loads(response.content[:length])["outputs"]
        assert (output["name"], output["datatype"]) == ("prediction", "FP64")


@FUZZ
@given(request=mixed_v2_requests())
def test_v2_requests_with_category_inputs_never_cause_a_server_error(
    mixed_client: TestClient, request: dict[str, Any]
) -> None:
    _assert_a_prediction_or_client_error(
        mixed_client.post(MIXED_INFER, content=json.dumps(request).encode())
    )


@FUZZ
@given(frame=mixed_binary_frames())
def test_binary_category_tensors_never_cause_a_server_error(
    mixed_client: TestClient, frame: tuple[bytes, dict[str, str]]
) -> None:
    body, headers = frame
    _assert_a_prediction_or_client_error(
        mixed_client.post(
            MIXED_INFER,
            content=body,
            headers=headers | {"content-type": "application/octet-stream"},
        )
    )
