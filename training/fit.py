"""Build the chosen estimator, fit it on a split, and score it on the held-out rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.manifest import Task
from training.datasets import Dataset, FeatureInfo
from training.errors import TrainingError
from training.onnx_export import ModelInput

ESTIMATORS = ("random_forest", "hist_gradient_boosting", "linear")


@dataclass(frozen=True)
class FitResult:
    model: Any  # a fitted estimator or pipeline (sklearn ships no type stubs)
    X_train: NDArray[Any]
    X_test: NDArray[Any]
    y_train: NDArray[Any]
    y_test: NDArray[Any]
    metrics: dict[str, Any]
    inputs: ModelInput  # how the model takes rows (a DataFrame when text is among them)


def with_encoder(estimator: Any, features: list[FeatureInfo]) -> Any:
    """One-hot-encode the text columns (selected by name) in front of the estimator;
    a category unseen in training encodes as all zeros rather than failing."""
    categories = [f.name for f in features if f.kind == "category"]
    if not categories:
        return estimator
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    encode = ColumnTransformer(
        [("categories", OneHotEncoder(handle_unknown="ignore", sparse_output=False), categories)],
        remainder="passthrough",
    )
    return Pipeline([("encode", encode), ("estimator", estimator)])


def build_estimator(
    kind: str, task: Task, *, n_estimators: int, max_depth: int | None, random_state: int
) -> Any:
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    classification = task == "classification"
    if kind == "random_forest":
        forest = RandomForestClassifier if classification else RandomForestRegressor
        return forest(n_estimators=n_estimators, max_depth=max_depth, random_state=random_state)
    if kind == "hist_gradient_boosting":
        boosting = (
            HistGradientBoostingClassifier if classification else HistGradientBoostingRegressor
        )
        return boosting(max_iter=n_estimators, max_depth=max_depth, random_state=random_state)
    if kind == "linear":
        # Scaled first: the solver converges, and coefficients are comparable.
        linear = LogisticRegression(max_iter=1000) if classification else LinearRegression()
        return Pipeline([("scale", StandardScaler()), ("model", linear)])
    raise TrainingError(f"unknown estimator {kind!r}; choose one of {ESTIMATORS}")


def score(
    model: Any, x: NDArray[Any], y: NDArray[Any], task: Task, y_pred: NDArray[Any] | None = None
) -> dict[str, Any]:
    """The task's scores of `model` on rows x with truth y (class indices or values)."""
    from sklearn import metrics as m

    predicted = model.predict(x) if y_pred is None else y_pred
    if task == "classification":
        return {
            "accuracy": float(m.accuracy_score(y, predicted)),
            "f1_macro": float(m.f1_score(y, predicted, average="macro", zero_division=0)),
        }
    return {
        # R² of a constant target is undefined: report 0 rather than NaN.
        "r2": float(m.r2_score(y, predicted)) if np.ptp(y) > 0 else 0.0,
        "mean_absolute_error": float(m.mean_absolute_error(y, predicted)),
        "root_mean_squared_error": float(np.sqrt(m.mean_squared_error(y, predicted))),
    }


def fit(
    data: Dataset,
    *,
    estimator: str = "random_forest",
    n_estimators: int,
    max_depth: int | None,
    random_state: int,
    test_size: float,
) -> FitResult:
    from sklearn.model_selection import train_test_split

    task = data.task or "classification"
    if data.y is None:
        raise TrainingError("fitting needs a target column")
    classification = task == "classification"
    try:
        # Stratified so every class is both learned and scored, even when rare.
        x_train, x_test, y_train, y_test = train_test_split(
            data.X,
            data.y,
            test_size=test_size,
            random_state=random_state,
            stratify=data.y if classification else None,
        )
    except ValueError as exc:
        detail = ""
        if classification and data.class_names is not None:
            counts = np.bincount(data.y, minlength=len(data.class_names))
            detail = f" (rows per class {counts.tolist()})"
        raise TrainingError(
            f"cannot split {len(data.y)} rows with --test-size {test_size}{detail}: {exc}"
        ) from None

    model = build_estimator(
        estimator, task, n_estimators=n_estimators, max_depth=max_depth, random_state=random_state
    )
    model = with_encoder(model, data.features)
    # Text columns are selected by name, so such a model is fitted on a DataFrame.
    inputs = ModelInput(data.features, as_frame=any(f.kind == "category" for f in data.features))
    model.fit(inputs.for_sklearn(x_train), y_train)
    # Label index == class index is what lets the service map probability
    # columns straight to `classes`.
    n_classes = len(data.class_names or ())
    if classification and not np.array_equal(model.classes_, np.arange(n_classes)):
        raise TrainingError("training split does not contain every class; add rows")

    metrics: dict[str, Any] = {
        "evaluated_on": "held_out",
        "n_rows": len(y_test),
        "n_train": len(y_train),
        "test_size": float(test_size),
        **score(model, inputs.for_sklearn(x_test), y_test, task),
    }
    return FitResult(model, x_train, x_test, y_train, y_test, metrics, inputs)
