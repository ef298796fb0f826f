"""One row of JSON numbers, and a one-row class answer, take plain-Python
shortcuts through the V2 codec; they must answer byte for byte as the general
(numpy) path, errors included."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from service.manifest import Manifest
from service.v2.infer import InferenceCodec
from service.v2.mapping import tensor_map
from service.v2.tensors import TensorError

CLASSES = ["setosa", "versicolor", "virginica"]


def _manifest(trained_bundle: Path, integer_feature: bool) -> Manifest:
    raw = json.loads((trained_bundle / "manifest.json").read_text())
    if integer_feature:
        feature = raw["features"][1]
        feature.update(kind="integer", exclusive_minimum=None, minimum=1, maximum=40)
    return Manifest.model_validate(raw)


def _codecs(manifest: Manifest) -> tuple[InferenceCodec, InferenceCodec]:
    fast = InferenceCodec(tensor_map(manifest), "iris", "1.0.0", max_rows=10)
    general = InferenceCodec(tensor_map(manifest), "iris", "1.0.0", max_rows=10)
    # Neither shortcut: every request takes _rows, every output its numpy functions.
    general._matrix = None
    general._one_row_json = False
    return fast, general


def _value(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.6:
        return round(rng.uniform(0.0, 45.0), rng.choice([1, 3, 7, 17]))  # some out of bounds
    if kind < 0.8:
        return rng.randint(-2, 45)
    if kind < 0.85:
        return rng.choice([0.0, -0.0, 1e-300, 43.9, 43.900000000000006, 3.4e38, 10**400])
    if kind < 0.9:
        return rng.choice([True, False, None, "5.1", [1.0], {"a": 1}])
    return rng.uniform(0.1, 40.0)


def _row(rng: random.Random) -> list[Any]:
    if rng.random() < 0.5:
        # A valid row (floats, and whole numbers where an integer feature may be).
        return [rng.choice([rng.uniform(0.1, 40.0), float(rng.randint(1, 40)), 7]) for _ in "abcd"]
    row = [_value(rng) for _ in range(4)]
    if rng.random() < 0.03:
        row = row[: rng.randint(0, 3)] + [1.0] * rng.randint(0, 2)  # wrong length
    return row


def _request(rng: random.Random) -> dict[str, Any]:
    row = _row(rng)
    entry: dict[str, Any] = {
        "name": "features",
        "shape": [1, 4],
        "datatype": rng.choice(["FP32"] * 6 + ["FP64"] * 3 + ["INT32", "FP16"]),
        "data": [row] if rng.random() < 0.3 else row,
    }
    rare = rng.random()
    if rare < 0.03:
        entry["shape"] = rng.choice([[True, 4], [1.0, 4], [1, 4.0], [2, 4], [4], None, [1, 3]])
    elif rare < 0.05:
        entry["name"] = rng.choice(["feature", 7, None])
    elif rare < 0.07:
        entry["parameters"] = rng.choice([{}, None, {"binary_data_size": 16}, []])
    elif rare < 0.08:
        del entry["data"]
    request: dict[str, Any] = {"inputs": [entry]}
    if rng.random() < 0.02:
        request["inputs"].append(dict(entry))
    if rng.random() < 0.3:
        request["id"] = rng.choice(["42", "a b", 42])
    if rng.random() < 0.3:
        request["parameters"] = {"binary_data_output": rng.choice([True, False, True, "yes"])}
    if rng.random() < 0.3:
        request["outputs"] = [
            {"name": name, "parameters": {"binary_data": rng.random() < 0.5}}
            for name in rng.sample(["predicted_class", "predicted_class_name", "probabilities"], 2)
        ]
    return request


def _inference(rng: random.Random) -> npt.NDArray[np.floating]:
    probabilities = [rng.random() for _ in CLASSES]
    if rng.random() < 0.2:
        probabilities[rng.randrange(3)] = rng.choice([1.0000001, -1e-7, float("nan"), 1.0, 0.0])
    # float64 as a backend may answer: the float32 output is a cast.
    return np.array([probabilities], dtype=rng.choice([np.float32, np.float32, np.float64]))


def _answer(codec: InferenceCodec, body: bytes, inference: npt.NDArray[Any]) -> Any:
    try:
        parsed = codec.decode(body, None)
    except TensorError as exc:
        return "error", str(exc)
    answer = codec.encode(parsed, inference)
    if parsed.one_row is not None:
        # Answered without the matrix ever being made.
        assert parsed._rows is None
        # The route hands a one-row answer over as Python floats, as the
        # backend's row call returns them.
        assert codec.encode(parsed, inference[0].tolist()) == answer
    rows = parsed.rows
    return rows.dtype.str, rows.shape, rows.tobytes(), answer


@pytest.mark.parametrize("integer_feature", [False, True])
def test_one_json_row_answers_byte_for_byte_as_the_general_path(
    trained_bundle: Path, integer_feature: bool
) -> None:
    fast, general = _codecs(_manifest(trained_bundle, integer_feature))
    rng = random.Random(20261130 + integer_feature)
    shortcut = errors = 0
    for _ in range(3000):
        request = _request(rng)
        body = json.dumps(request).encode()
        inference = _inference(rng)
        answer = _answer(fast, body, inference)
        assert answer == _answer(general, body, inference), body
        shortcut += fast._one_json_row(request["inputs"]) is not None
        errors += answer[0] == "error"
    # Both sides of the shortcut were exercised, and many errors compared.
    assert shortcut > 500
    assert errors > 500, errors


def test_a_single_row_shortcut_gives_the_numpy_outputs(trained_bundle: Path) -> None:
    outputs = {o.name: o for o in tensor_map(_manifest(trained_bundle, False)).outputs}
    names = np.asarray(CLASSES, dtype=object)
    rng = random.Random(7)
    for _ in range(2000):
        rows = rng.choice([1, 1, 1, 2, 5, 30])
        inference = np.array(
            [[rng.choice([rng.random(), 1.0000001, -0.5, float("nan")]) for _ in CLASSES]] * rows,
            dtype=rng.choice([np.float32, np.float64]),
        )
        probabilities = outputs["probabilities"].values(inference)
        expected = np.ascontiguousarray(np.clip(inference, 0.0, 1.0), dtype=np.float32)
        assert probabilities.dtype == expected.dtype
        assert probabilities.tobytes() == expected.tobytes()
        winners = outputs["predicted_class_name"].values(inference)
        assert outputs["predicted_class_name"].json(winners) == names[winners].tolist()
