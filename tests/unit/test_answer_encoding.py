"""A single row's answer is built in plain Python: it must equal the batch path's, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.backends.base import winning_class
from service.predict_codec import PredictCodec

NAMES = ["setosa", "versicolor", "virginica"]


def _pipeline() -> PredictCodec:
    # Only the class names matter to the answer encoding.
    codec = PredictCodec.__new__(PredictCodec)
    codec._class_names = NAMES
    return codec


def _batch_answer(pipeline: PredictCodec, row: np.ndarray) -> dict[str, object]:
    # Two rows take the numpy path; the first is the row itself.
    return pipeline.class_predictions(np.vstack([row, row]))[0]


def _rows() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    rows: list[np.ndarray] = []
    for _ in range(20_000):
        rows.append(rng.dirichlet(np.ones(3)).astype(np.float32))
        # Values on and next to a rounding half at the 7th decimal.
        halves = rng.integers(0, 10**7, 3) / 1e7 + rng.choice([0.0, 5e-8, -5e-8], 3)
        rows.append(halves.astype(np.float64))
    # float32 sums of trees above 1, tiny negatives, ties (the first wins).
    rows += [
        np.array([1.0000001, -1e-9, 0.5], dtype=np.float32),
        np.array([0.5, 0.5, 0.0], dtype=np.float32),
        np.array([0.0, 0.0, 0.0], dtype=np.float32),
    ]
    return rows


def test_single_row_answers_equal_the_batch_paths_bit_for_bit() -> None:
    pipeline = _pipeline()
    for row in _rows():
        single = pipeline.class_predictions(row[None, :])[0]
        assert single == _batch_answer(pipeline, row), row
        assert all(type(value) is float for value in single["probabilities"].values())


def test_a_tie_goes_to_the_first_class_as_argmax_does() -> None:
    answer = _pipeline().class_predictions(np.array([[0.4, 0.4, 0.2]], dtype=np.float32))[0]
    assert answer["predicted_class"] == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_probability_answers_as_the_batch_path_does(bad: float) -> None:
    pipeline = _pipeline()
    row = np.array([bad, 0.5, 0.5], dtype=np.float32)
    single = pipeline.class_predictions(row[None, :])[0]
    batch = _batch_answer(pipeline, row)
    # NaN != NaN: compare the JSON-level shape instead.
    assert repr(single) == repr(batch)


def test_the_winning_class_of_a_row_is_numpys_argmax() -> None:
    rng = np.random.default_rng(3)
    specials = [math.nan, math.inf, -math.inf, 0.5, 0.5, 0.0]
    rows = [rng.dirichlet(np.ones(4)) for _ in range(2_000)]
    rows += [rng.choice(specials, 4) for _ in range(2_000)]
    for row in rows:
        assert winning_class(row.tolist()) == int(row.argmax()), row
