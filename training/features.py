"""Per-feature statistics and the plausibility bounds the service enforces."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from service.manifest import bin_edges
from training.datasets import FeatureInfo
from training.errors import TrainingError

# What refuses a value beyond its type: "plausible" adds the wide range around
# the reference data (fitting, and packaging with --strict-bounds); "declared"
# only the bounds a data set or the user declared (packaging's default).
BoundsPolicy = Literal["plausible", "declared"]

# Far outside the training range a value is almost always a unit or encoding
# mistake, yet a model should still accept honest outliers: allow 10 spans.
BOUND_SPANS = 10.0
DECILE_LEVELS = tuple(i / 10 for i in range(1, 10))
# The model computes in float32, which holds every integer up to 2**24 exactly.
INTEGER_LIMIT = float(2**24)


def tidy(value: float) -> float:
    """Ten significant digits: 43.900000000000006 becomes 43.9 in the manifest,
    the OpenAPI schema and the metric bucket labels. Rounding is monotonic,
    so ordered values stay ordered."""
    return float(f"{value:.10g}")


def bounds(column: NDArray[np.float64], integer: bool = False) -> dict[str, float]:
    """Bounds for one feature: keys are the manifest's minimum/exclusive_minimum/maximum."""
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
    if integer:
        result = {
            key: float(
                np.clip(np.floor(v) if "min" in key else np.ceil(v), -INTEGER_LIMIT, INTEGER_LIMIT)
            )
            for key, v in result.items()
        }
    return result


def deciles(column: NDArray[np.float64]) -> list[float]:
    edges = np.quantile(column, DECILE_LEVELS)
    # Linear interpolation can step back by one ulp between equal neighbours;
    # the manifest requires non-decreasing edges.
    edges = np.maximum.accumulate(edges)
    return [tidy(float(v)) for v in edges]


def bin_shares(column: NDArray[np.float64], edges: list[float]) -> list[float]:
    """The share of rows in each live histogram bucket: (-inf, e0], (e0, e1], ...,
    (e_last, +inf) over the distinct edges. Ties at an edge make the shares uneven,
    and drift is measured against these, not a flat 10%."""
    bins = np.searchsorted(np.asarray(bin_edges(edges)), column, side="left")
    counts = np.bincount(bins, minlength=len(bin_edges(edges)) + 1)
    return [float(c) / len(column) for c in counts.tolist()]


def numeric_statistics(column: NDArray[np.float64]) -> dict[str, Any]:
    edges = deciles(column)
    return {
        "training_min": float(column.min()),
        "training_max": float(column.max()),
        "training_mean": float(column.mean()),
        "deciles": edges,
        "bin_shares": bin_shares(column, edges),
    }


def prediction_shares(
    outputs: NDArray[np.float64], classes: list[str] | None, target: dict[str, Any] | None
) -> list[float] | None:
    """What the live prediction metrics count, on the reference rows: the share of
    each predicted class (the service counts the arg-max), or of the predictions
    in each bucket of the target's deciles."""
    if classes is not None:
        counts = np.bincount(outputs.argmax(axis=1), minlength=len(classes))
        return [float(c) / len(outputs) for c in counts.tolist()]
    if target is None:
        return None
    return bin_shares(outputs, target["deciles"])


def target_statistics(y: NDArray[np.float64]) -> dict[str, Any]:
    return {
        "minimum": float(y.min()),
        "maximum": float(y.max()),
        "mean": float(y.mean()),
        "deciles": deciles(y),
    }


def absent(column: NDArray[Any]) -> NDArray[np.bool_]:
    """Where a column (floats, or objects from a CSV) holds a missing value."""
    if column.dtype != object:
        return np.isnan(np.asarray(column, dtype=np.float64))
    return np.asarray([v is None or (isinstance(v, float) and v != v) for v in column], bool)


def category_statistics(column: NDArray[Any]) -> dict[str, Any]:
    """The closed set, most frequent first, with each value's share of the rows."""
    counts = Counter(str(v) for v in column)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    total = sum(counts.values())
    return {
        "categories": [value for value, _ in ordered],
        "frequencies": [count / total for _, count in ordered],
    }


def feature_spec(
    info: FeatureInfo,
    column: NDArray[Any] | None,
    policy: BoundsPolicy = "plausible",
    nullable: bool = False,
) -> dict[str, Any]:
    """One manifest feature entry; without reference data only the kind and type
    bounds. Statistics describe the values present; the missing rate the rest."""
    spec: dict[str, Any] = {
        "kind": info.kind,
        "name": info.name,
        "description": info.description,
        "unit": info.unit,
        "nullable": nullable,
    }
    if column is not None:
        missing = absent(column)
        if missing.all():
            raise TrainingError(f"feature {info.name!r} has no value in the reference data")
        spec["missing_rate"] = float(missing.mean())
        if missing.any() and not nullable:
            raise ValueError(f"feature {info.name!r} has missing values but is not nullable")
        column = column[~missing]
    if info.kind == "category":
        if column is None:
            raise ValueError(f"category feature {info.name!r} needs its allowed values")
        return spec | category_statistics(column)
    if column is None:
        if info.kind == "integer":
            spec |= {"minimum": -INTEGER_LIMIT, "maximum": INTEGER_LIMIT}
        return declared(spec, info)
    numbers = np.asarray(column, dtype=np.float64)
    if policy == "plausible":
        spec |= bounds(numbers, integer=info.kind == "integer")
    return declared(spec, info) | numeric_statistics(numbers)


def declared(spec: dict[str, Any], info: FeatureInfo) -> dict[str, Any]:
    """The spec with the declared bounds in place of whatever bound of the same
    side came before."""
    if not info.declared_bounds:
        return spec
    spec = {**spec, "bounds_declared": True}
    for key, value in info.declared_bounds.items():
        side = "minimum" if "minimum" in key else "maximum"
        spec.pop(f"exclusive_{side}" if key == side else side, None)
        spec[key] = value
    return spec


def feature_specs(x: NDArray[Any], infos: list[FeatureInfo]) -> list[dict[str, Any]]:
    """Manifest feature entries, computed from the rows the model was fitted on."""
    return [feature_spec(info, x[:, j]) for j, info in enumerate(infos)]
