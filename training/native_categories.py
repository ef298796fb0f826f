"""Columns a model took as pandas `category` dtype, and their categories, read
from the fitted model itself. The one module that reads LightGBM's, XGBoost's
and HistGradientBoosting's categorical internals (tests/unit/test_native_categories.py
pins them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from training import model_steps


def native_categories(model: Any, names: Sequence[str]) -> dict[str, list[str] | None]:
    """Feature name -> the categories the model knows for it, in its own order;
    None where the model takes the column as `category` but does not say which
    (XGBoost before 3.1, or without pyarrow): the reference data's values are
    used then."""
    found: dict[str, list[str] | None] = {}
    for _, step in model_steps.named_steps(model):
        module = type(step).__module__.split(".")[0]
        if module == "lightgbm":
            found |= _lightgbm(step, names)
        elif module == "xgboost":
            found |= _xgboost(step, names)
        elif module == "sklearn" and hasattr(step, "is_categorical_"):
            found |= _hist_gradient_boosting(step, names)
    return found


def _lightgbm(step: Any, names: Sequence[str]) -> dict[str, list[str] | None]:
    booster: Any = getattr(step, "booster_", None)
    categorical = getattr(booster, "pandas_categorical", None)
    if booster is None or not categorical:
        return {}
    # pandas_categorical lists the categories of the DataFrame's category
    # columns in column order; the booster's categorical_column are their indexes.
    columns = booster.params.get("categorical_column") or []
    if len(columns) != len(categorical):
        columns = [i for i in columns if i < len(names)][: len(categorical)]
    return {
        names[int(i)]: [str(c) for c in values]
        for i, values in zip(columns, categorical, strict=False)
    }


def _xgboost(step: Any, names: Sequence[str]) -> dict[str, list[str] | None]:
    booster: Any = step.get_booster() if hasattr(step, "get_booster") else None
    types = getattr(booster, "feature_types", None) or []
    columns = [j for j, kind in enumerate(types) if kind == "c"]
    if not columns:
        return {}
    found: dict[str, list[str] | None] = {names[j]: None for j in columns}
    try:
        # XGBoost 3.1+ records the categories it was fitted on (and recodes any
        # DataFrame to them): one (name, Arrow array or None) per feature.
        arrays = booster.get_categories(export_to_arrow=True).to_arrow()
    except Exception:
        return found  # before 3.1, or without pyarrow: the reference data says
    for j in columns:
        values = arrays[j][1] if j < len(arrays) else None
        if values is not None:
            found[names[j]] = [str(v) for v in values.to_pylist()]
    return found


def _hist_gradient_boosting(step: Any, names: Sequence[str]) -> dict[str, list[str] | None]:
    mask = step.is_categorical_
    preprocessor = getattr(step, "_preprocessor", None)
    if mask is None or preprocessor is None or step.categorical_features != "from_dtype":
        return {}
    # With categorical_features="from_dtype" the category columns go through an
    # OrdinalEncoder, which holds their categories.
    encoder = preprocessor.named_transformers_["encoder"]
    columns = [j for j, flag in enumerate(mask) if flag]
    return {
        names[j]: [str(v) for v in values if isinstance(v, str)]
        for j, values in zip(columns, encoder.categories_, strict=True)
    }
