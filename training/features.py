"""Per-feature statistics and the plausibility bounds the service enforces."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from training.datasets import FeatureInfo

# Far outside the training range a value is almost always a unit or encoding
# mistake, yet a model should still accept honest outliers: allow 10 spans.
BOUND_SPANS = 10.0
DECILE_LEVELS = tuple(i / 10 for i in range(1, 10))


def tidy(value: float) -> float:
    """Ten significant digits: 43.900000000000006 becomes 43.9 in the manifest,
    the OpenAPI schema and the metric bucket labels. Rounding is monotonic,
    so ordered values stay ordered."""
    return float(f"{value:.10g}")


def bounds(column: NDArray[np.float64]) -> dict[str, float]:
    """Bounds for one feature: keys are FeatureSpec's minimum/exclusive_minimum/maximum."""
    lo = float(column.min())
    hi = float(column.max())
    span = hi - lo
    if span == 0:
        # A constant column still needs room for nearby values.
        span = max(abs(hi), 1.0)
    result: dict[str, float] = {}
    if lo > 0:
        # Strictly positive in training (lengths, counts of something present):
        # zero or below is a mistake, not an outlier.
        result["exclusive_minimum"] = 0.0
    elif lo == 0:
        result["minimum"] = 0.0
    else:
        result["minimum"] = tidy(lo - BOUND_SPANS * span)
    result["maximum"] = tidy(hi + BOUND_SPANS * span)
    return result


def deciles(column: NDArray[np.float64]) -> list[float]:
    edges = np.quantile(column, DECILE_LEVELS)
    # Linear interpolation can step back by one ulp between equal neighbours;
    # the manifest requires non-decreasing edges.
    edges = np.maximum.accumulate(edges)
    return [tidy(float(v)) for v in edges]


def feature_specs(x: NDArray[np.float64], infos: list[FeatureInfo]) -> list[dict[str, Any]]:
    """FeatureSpec dicts for the manifest, computed from the rows the model was fitted on."""
    specs: list[dict[str, Any]] = []
    for j, info in enumerate(infos):
        column = x[:, j]
        specs.append(
            {
                "name": info.name,
                "description": info.description,
                "unit": info.unit,
                **bounds(column),
                "training_min": float(column.min()),
                "training_max": float(column.max()),
                "training_mean": float(column.mean()),
                "deciles": deciles(column),
            }
        )
    return specs
