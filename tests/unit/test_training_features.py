"""Feature statistics and the plausibility bounds recorded in the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from training.datasets import FeatureInfo, load_builtin
from training.features import bin_shares, bounds, deciles, feature_specs


def test_iris_bounds_exclude_zero_and_allow_ten_spans_above() -> None:
    data = load_builtin("iris")
    specs = feature_specs(data.X, data.features)
    sepal_length = specs[0]
    assert sepal_length["name"] == "sepal_length"
    assert sepal_length["unit"] == "cm"
    assert sepal_length["training_min"] == pytest.approx(4.3)
    assert sepal_length["training_max"] == pytest.approx(7.9)
    assert sepal_length["maximum"] == pytest.approx(7.9 + 10 * (7.9 - 4.3))
    for spec in specs:
        assert spec["exclusive_minimum"] == 0.0
        assert "minimum" not in spec
        assert spec["training_min"] <= spec["training_mean"] <= spec["training_max"]


def test_bounds_for_a_column_with_negatives_extend_ten_spans_below() -> None:
    column = np.array([-2.0, 0.0, 3.0])
    assert bounds(column) == {"minimum": -2.0 - 50.0, "maximum": 3.0 + 50.0}


def test_bounds_for_a_column_starting_at_zero_use_an_inclusive_zero_minimum() -> None:
    column = np.array([0.0, 1.0, 4.0])
    assert bounds(column) == {"minimum": 0.0, "maximum": 44.0}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5.0, {"exclusive_minimum": 0.0, "maximum": 55.0}),  # span = |max|
        (0.0, {"minimum": 0.0, "maximum": 10.0}),  # span = 1
        (-0.5, {"minimum": -10.5, "maximum": 9.5}),  # span = 1 (|max| < 1)
    ],
)
def test_bounds_for_a_constant_column_use_a_fallback_span(
    value: float, expected: dict[str, float]
) -> None:
    assert bounds(np.full(7, value)) == expected


def test_deciles_are_nine_non_decreasing_plain_floats() -> None:
    column = np.arange(1.0, 101.0)
    edges = deciles(column)
    assert len(edges) == 9
    assert edges == sorted(edges)
    assert all(type(v) is float for v in edges)
    assert edges[0] == pytest.approx(10.9)
    assert edges[4] == pytest.approx(50.5)


def test_deciles_of_a_nearly_constant_column_never_step_back() -> None:
    # Interpolating between equal neighbours can lose an ulp; still sorted.
    column = np.array([0.1 + 0.2] * 50 + [0.3] * 50 + [1e-300])
    edges = deciles(column)
    assert edges == sorted(edges)


def test_feature_specs_hold_only_json_plain_values() -> None:
    x = np.array([[1.0, -1.0], [2.0, 1.0], [3.0, 0.5]])
    infos = [FeatureInfo("a", "A", "m"), FeatureInfo("b", "B", None)]
    specs = feature_specs(x, infos)
    for spec in specs:
        for key, value in spec.items():
            if key in ("deciles", "bin_shares"):
                assert all(type(v) is float for v in value)
            elif key == "nullable":
                assert value is False
            elif key not in ("kind", "name", "description", "unit"):
                assert type(value) is float, key
    assert specs[1]["minimum"] == pytest.approx(-1.0 - 20.0)
    assert specs[1]["training_mean"] == pytest.approx(0.5 / 3)


def test_bin_shares_count_rows_as_the_live_histogram_buckets_them() -> None:
    # Tied deciles make one edge; a value equal to an edge falls in that edge's
    # bucket (le), so half the rows sit in the first bin, not a flat 10%.
    column = np.array([1.0] * 50 + [float(v) for v in range(2, 52)])
    edges = deciles(column)
    shares = bin_shares(column, edges)
    assert len(shares) == len(set(edges)) + 1
    assert shares[0] == pytest.approx(0.5)
    assert sum(shares) == pytest.approx(1.0)
