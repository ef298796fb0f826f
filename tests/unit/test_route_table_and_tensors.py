"""The fast path's route table, the one error table, and V2 tensor decoding, without a server."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from starlette.exceptions import HTTPException

from service import fastpath
from service.batching import BatchQueueFullError, InferenceError
from service.errors import (
    BodyTooLargeError,
    ErrorAnswer,
    ModelNotLoadedError,
    NotFoundError,
    answer_for,
    error_payload,
)
from service.fastpath import FastRequest, FastResponse, FastRoute, RouteTable
from service.predict_codec import RequestBodyError
from service.routes.table import FAST_ROUTES
from service.v2.tensors import NUMERIC_DATATYPES, TensorError, binary_tensor, json_tensor

NAMES = ("a", "b")


async def _handler(request: FastRequest) -> FastResponse:
    return FastResponse(b"{}")


def _route(method: str, path: str) -> FastRoute:
    return FastRoute(method, path, _handler, "", (), lambda components, pipeline: {}, "op")


def test_templates_match_one_segment_per_parameter() -> None:
    table = RouteTable([_route("GET", "/v2/models/{model_name}/versions/{model_version}")])
    found = table.match("/v2/models/iris/versions/1.0.0")
    assert found is not None
    assert found[1] == {"model_name": "iris", "model_version": "1.0.0"}
    assert table.match("/v2/models/iris/versions/1.0.0/extra") is None
    assert table.match("/v2/models/a/b/versions/1") is None


def test_a_remembered_match_answers_as_the_first_and_the_memo_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fastpath, "MATCH_MEMO_SIZE", 4)
    table = RouteTable([_route("POST", "/v2/models/{model_name}/infer")])
    first = table.match("/v2/models/iris/infer")
    assert first is not None
    first[1]["model_name"] = "changed by a caller"
    again = table.match("/v2/models/iris/infer")
    assert again is not None
    assert again[1] == {"model_name": "iris"}
    assert again[0] is first[0]
    for index in range(50):
        found = table.match(f"/v2/models/m{index}/infer")
        assert found is not None
        assert found[1] == {"model_name": f"m{index}"}
        assert len(table._matched) <= 4


def test_static_paths_win_and_v2_tolerates_one_trailing_slash() -> None:
    table = RouteTable([_route("GET", "/v2"), _route("POST", "/predict")])
    assert table.match("/v2/") == table.match("/v2")
    assert table.match("/predict/") is None


def test_a_route_declared_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        RouteTable([_route("GET", "/x"), _route("GET", "/x")])


def test_the_service_table_declares_each_route_once() -> None:
    keys = [(route.method, route.path) for route in FAST_ROUTES]
    assert len(keys) == len(set(keys))
    RouteTable(FAST_ROUTES)
    assert ("POST", "/predict") in keys
    assert ("POST", "/v2/models/{model_name}/versions/{model_version}/infer") in keys


SCOPE = {"path": "/predict", "state": {"request_id": "r1"}}


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RequestBodyError([{"loc": ["body"]}]), ErrorAnswer(422, [{"loc": ["body"]}])),
        (
            BodyTooLargeError(10, 20),
            ErrorAnswer(
                413,
                "request body of 20 bytes exceeds the limit of 10 bytes",
                {"connection": "close"},
            ),
        ),
        (BatchQueueFullError("full"), ErrorAnswer(503, "server busy: full", {"retry-after": "1"})),
        (InferenceError("boom"), ErrorAnswer(500, "boom")),
        (ModelNotLoadedError(), ErrorAnswer(503, "model not loaded", {"retry-after": "1"})),
        (NotFoundError("nope"), ErrorAnswer(404, "nope")),
        (TensorError("bad"), ErrorAnswer(400, "bad")),
        (HTTPException(405, "Method Not Allowed"), ErrorAnswer(405, "Method Not Allowed")),
    ],
)
def test_one_table_answers_every_known_exception(exc: Exception, expected: ErrorAnswer) -> None:
    assert answer_for(exc, SCOPE) == expected


def test_anything_else_is_a_logged_500() -> None:
    assert answer_for(RuntimeError("bug"), SCOPE) == ErrorAnswer(500, "internal server error")


def test_the_body_shape_follows_the_api_family() -> None:
    assert error_payload(SCOPE, "x") == b'{"detail":"x","request_id":"r1"}'
    assert error_payload({**SCOPE, "path": "/v2/models/iris/infer"}, "x") == b'{"error":"x"}'
    listed = error_payload({"path": "/v2"}, [{"loc": ["body", "a"], "msg": "bad"}])
    assert listed == b'{"error":"body.a: bad"}'


def _json(data: Any, datatype: str = "FP32", shape: tuple[int, int] = (2, 2)) -> np.ndarray:
    return json_tensor(data, NUMERIC_DATATYPES[datatype], shape, "input 'x'", NAMES, True)


def test_flat_and_nested_data_give_the_same_tensor() -> None:
    np.testing.assert_array_equal(_json([1, 2.5, 3, 4]), _json([[1, 2.5], [3, 4]]))
    assert _json([1, 2, 3, 4], "INT64").dtype == np.int64


@pytest.mark.parametrize(
    ("data", "datatype", "message"),
    [
        ([1, 2, 3], "FP32", "needs 4 elements"),
        ([[1, 2], [3]], "FP32", "nested data"),
        ([[1, 2], 3, 4], "FP32", "nested data"),
        ([1, [2], 3, 4], "FP32", "row 0 feature .b.: is an array"),
        ([1, 2, 3, True], "FP32", "row 1 feature 'b': is a boolean"),
        ([1, None, 3, 4], "FP32", "row 0 feature 'b': is null"),
        ([1, 2, "3", 4], "FP32", "is a string"),
        ([1, 2, 3, 4.5], "INT32", "not an integer"),
        ([1, 2, 3, 2**40], "INT32", "out of range for INT32"),
        ([1, 2, -3, 4], "UINT8", "out of range for UINT8"),
        ({"a": 1}, "FP32", "must be an array"),
    ],
)
def test_wrong_json_data_names_row_and_feature(data: Any, datatype: str, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        _json(data, datatype)


def test_binary_data_is_read_little_endian_in_place() -> None:
    raw = b"junk" + np.array([1, 2, 3, 4], dtype="<f4").tobytes()
    tensor = binary_tensor(raw, 4, 16, NUMERIC_DATATYPES["FP32"], (2, 2), "input 'x'")
    assert tensor.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(TensorError, match="needs 16"):
        binary_tensor(raw, 4, 12, NUMERIC_DATATYPES["FP32"], (2, 2), "input 'x'")
