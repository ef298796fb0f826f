"""Open Inference Protocol inference for a model with category features, on both backends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from service.v2.tensors import bytes_tensor_binary
from tests.support.bundles import pinned_digests
from tests.support.user_models import MIXED_NAME, package_mixed_regressor
from tests.support.v2 import HEADER_LENGTH, read_response

INFER = f"/v2/models/{MIXED_NAME}/infer"
ROWS = [
    {"rooms": 3, "area": 80.5, "city": "lyon"},
    {"rooms": 1, "area": 21.0, "city": "paris"},
    {"rooms": 7, "area": 199.9, "city": "nice"},
]
NUMBERS = [[row["rooms"], row["area"]] for row in ROWS]
CITIES = [str(row["city"]) for row in ROWS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_mixed_regressor(tmp_path_factory.mktemp("flats"))


@pytest.fixture(params=["onnx", "sklearn"])
def flats(request: pytest.FixtureRequest, model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServiceSettings(
        model_dir=model_dir,
        model_name=MIXED_NAME,
        backend=request.param,
        trusted_model_sha256=pinned_digests(model_dir),
        api_keys_file=tmp_path / "no-api-keys",
        auth="off",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _inputs(numbers: Any = NUMBERS, cities: Any = CITIES, **city: Any) -> list[dict[str, Any]]:
    return [
        {"name": "features", "shape": [len(numbers), 2], "datatype": "FP32", "data": numbers},
        {"name": "city", "shape": [len(cities)], "datatype": "BYTES", "data": cities, **city},
    ]


def _binary(
    cities: list[bytes], numbers: Any = NUMBERS, **header: Any
) -> tuple[bytes, dict[str, str]]:
    """Both inputs as binary data: FP32 little-endian, BYTES length-prefixed."""
    raw_numbers = np.asarray(numbers, dtype="<f4").tobytes()
    raw_cities = bytes_tensor_binary(cities)
    request = {
        "inputs": [
            {
                "name": "features",
                "shape": [len(numbers), 2],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw_numbers)},
            },
            {
                "name": "city",
                "shape": [len(cities)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(raw_cities)},
            },
        ],
        **header,
    }
    encoded = json.dumps(request).encode()
    return encoded + raw_numbers + raw_cities, {HEADER_LENGTH: str(len(encoded))}


def _predictions(client: TestClient) -> list[float]:
    response = client.post("/predict/batch", json={"instances": ROWS})
    assert response.status_code == 200, response.text
    return [answer["prediction"] for answer in response.json()["predictions"]]


def _error(response: Any) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert len(body["error"]) < 1500
    return str(body["error"])


def test_metadata_lists_the_numeric_matrix_and_one_bytes_input_per_category(
    flats: TestClient,
) -> None:
    body = flats.get(f"/v2/models/{MIXED_NAME}").json()
    assert body["inputs"] == [
        {
            "name": "features",
            "datatype": "FP32",
            "shape": [-1, 2],
            "parameters": {"feature_names": ["rooms", "area"], "nullable": [False, False]},
        },
        {
            "name": "city",
            "datatype": "BYTES",
            "shape": [-1],
            "parameters": {
                "feature_names": ["city"],
                "nullable": [False],
                "categories": body["inputs"][1]["parameters"]["categories"],
            },
        },
    ]
    assert body["outputs"] == [{"name": "prediction", "datatype": "FP64", "shape": [-1]}]
    assert body["properties"]["feature_names"] == ["rooms", "area", "city"]
    assert sorted(body["properties"]["categories"]["city"]) == ["lyon", "nice", "paris"]


def test_json_inference_equals_predict_for_the_same_rows(flats: TestClient) -> None:
    response = flats.post(INFER, json={"id": "7", "inputs": _inputs()})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "7"
    outputs = read_response(response.content, None)
    assert outputs["outputs"]["prediction"].tolist() == pytest.approx(_predictions(flats), rel=1e-6)


@pytest.mark.parametrize("nested", [False, True])
def test_a_category_input_may_be_shaped_rows_by_one(flats: TestClient, nested: bool) -> None:
    data: list[Any] = [[city] for city in CITIES] if nested else CITIES
    inputs = _inputs(cities=data)
    inputs[1]["shape"] = [len(CITIES), 1]
    response = flats.post(INFER, json={"inputs": inputs[::-1]})
    assert response.status_code == 200, response.text
    outputs = read_response(response.content, None)
    assert outputs["outputs"]["prediction"].tolist() == pytest.approx(_predictions(flats), rel=1e-6)


def test_binary_inputs_and_outputs_equal_predict(flats: TestClient) -> None:
    body, headers = _binary(
        [city.encode() for city in CITIES], parameters={"binary_data_output": True}
    )
    response = flats.post(
        INFER, content=body, headers={**headers, "content-type": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text
    outputs = read_response(response.content, response.headers[HEADER_LENGTH])
    assert outputs["outputs"]["prediction"].tolist() == pytest.approx(_predictions(flats), rel=1e-6)


def test_an_unknown_category_is_400_naming_input_row_feature_and_allowed_values(
    flats: TestClient,
) -> None:
    error = _error(flats.post(INFER, json={"inputs": _inputs(cities=["lyon", "Lyon", "x"])}))
    assert "input 'city' row 1 feature 'city'" in error
    assert '"Lyon"' in error
    assert all(f'"{city}"' in error for city in ("lyon", "nice", "paris"))
    assert "1 more invalid" in error


def test_a_huge_unknown_value_gives_a_bounded_message(flats: TestClient) -> None:
    body, headers = _binary([b"lyon", b"\xff" * 100_000, b"nice"])
    error = _error(
        flats.post(INFER, content=body, headers={**headers, "content-type": "application/json"})
    )
    assert "row 1 feature 'city'" in error


def _with_city(**changes: Any) -> dict[str, Any]:
    inputs = _inputs()
    inputs[1].update(changes)
    return {"inputs": [entry for entry in inputs if entry.get("name") is not None]}


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "numeric datatype": (_with_city(datatype="FP32"), "datatype 'FP32' is not accepted"),
    "unknown datatype": (_with_city(datatype="STRING"), "unknown datatype"),
    "number as a value": (_with_city(data=["lyon", 3, "nice"]), "is 3, not a string"),
    "null as a value": (_with_city(data=["lyon", None, "nice"]), "is null, not a string"),
    "data not an array": (_with_city(data="lyon"), "data must be an array"),
    "too few elements": (_with_city(data=["lyon", "nice"]), "data has 2 elements"),
    "ragged nested data": (_with_city(data=[["lyon"], ["nice", "x"], ["paris"]]), "nested"),
    "two columns": (_with_city(shape=[3, 2]), "shape must be [rows] or [rows, 1]"),
    "shape not a list": (_with_city(shape=3), "shape must be"),
    "no rows": (_with_city(shape=[0], data=[]), "must have 1 to"),
    "no data": (
        {"inputs": [_inputs()[0], {"name": "city", "shape": [3], "datatype": "BYTES"}]},
        "no data",
    ),
    "row counts differ": (
        {"inputs": _inputs(cities=["lyon", "nice"])},
        "'features' has 3, 'city' has 2",
    ),
    "missing category input": ({"inputs": _inputs()[:1]}, "missing input 'city'"),
    "missing numeric input": ({"inputs": _inputs()[1:]}, "missing input 'features'"),
    "unknown input": (
        {
            "inputs": [
                *_inputs(),
                {"name": "town", "shape": [3], "datatype": "BYTES", "data": CITIES},
            ]
        },
        "unknown input 'town'",
    ),
    "category given twice": ({"inputs": [*_inputs(), _inputs()[1]]}, "given twice"),
    "fraction for an integer feature": (
        {"inputs": _inputs(numbers=[[3, 80.5], [2.5, 30.0], [1, 20.0]])},
        "input 'features' row 1 feature 'rooms': 2.5 is not an integer",
    ),
    "BYTES for the numeric matrix": (
        {"inputs": [{**_inputs()[0], "datatype": "BYTES"}, _inputs()[1]]},
        "datatype 'BYTES' is not accepted",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_category_requests_are_400_naming_what_is_wrong(
    flats: TestClient, case: str
) -> None:
    request, expected = INVALID[case]
    assert expected in _error(flats.post(INFER, json=request))


def _framed(
    cities: list[bytes], size_delta: int = 0, extra: bytes = b""
) -> tuple[bytes, dict[str, str]]:
    body, headers = _binary(cities)
    length = int(headers[HEADER_LENGTH])
    request = json.loads(body[:length])
    request["inputs"][1]["parameters"]["binary_data_size"] += size_delta
    header = json.dumps(request).encode()
    return header + body[length:] + extra, {HEADER_LENGTH: str(len(header))}


BINARY: dict[str, tuple[tuple[bytes, dict[str, str]], str]] = {
    "fewer elements than rows": (_framed([b"lyon", b"nice"]), "'features' has 3, 'city' has 2"),
    "truncated length prefix": (_framed([b"lyon", b"nice", b"paris"], -7), "truncated length"),
    "element past its size": (_framed([b"lyon", b"nice", b"paris"], -2), "are left in its"),
    "bytes left over": (_framed([b"lyon", b"nice", b"paris"], 3, b"abc"), "left over"),
    "size past the body": (_framed([b"lyon", b"nice", b"paris"], 10), "past the end"),
    "not UTF-8": (_framed([b"lyon", b"\xc3\x28", b"paris"]), "row 1 feature 'city'"),
}


@pytest.mark.parametrize("case", BINARY)
def test_malformed_binary_category_tensors_are_400(flats: TestClient, case: str) -> None:
    (body, headers), expected = BINARY[case]
    response = flats.post(
        INFER, content=body, headers={**headers, "content-type": "application/octet-stream"}
    )
    assert expected in _error(response)


def test_the_openapi_example_is_a_valid_request(flats: TestClient) -> None:
    document = flats.get("/openapi.json").json()
    body = document["paths"][INFER.replace(MIXED_NAME, "{model_name}")]["post"]["requestBody"]
    example = body["content"]["application/json"]["example"]
    assert [entry["datatype"] for entry in example["inputs"]] == ["FP32", "BYTES"]
    assert flats.post(INFER, json=example).status_code == 200
