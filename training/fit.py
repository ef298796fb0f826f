"""Fit the classifier on a stratified split and measure it on the held-out rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from training.datasets import Dataset
from training.errors import TrainingError


@dataclass(frozen=True)
class FitResult:
    model: Any  # a fitted RandomForestClassifier (sklearn ships no type stubs)
    X_train: NDArray[np.float64]
    X_test: NDArray[np.float64]
    y_train: NDArray[np.int64]
    y_test: NDArray[np.int64]
    metrics: dict[str, float | int]


def fit(
    data: Dataset,
    *,
    n_estimators: int,
    max_depth: int | None,
    random_state: int,
    test_size: float,
) -> FitResult:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split

    try:
        # Stratified so every class is both learned and scored, even when rare.
        x_train, x_test, y_train, y_test = train_test_split(
            data.X, data.y, test_size=test_size, random_state=random_state, stratify=data.y
        )
    except ValueError as exc:
        counts = np.bincount(data.y, minlength=len(data.class_names))
        raise TrainingError(
            f"cannot make a stratified split of {len(data.y)} rows with --test-size "
            f"{test_size} (rows per class {counts.tolist()}): {exc}"
        ) from None

    model = RandomForestClassifier(
        n_estimators=n_estimators, max_depth=max_depth, random_state=random_state
    )
    model.fit(x_train, y_train)
    # Label index == class index is what lets the service map ONNX labels and
    # probability columns straight to `classes`.
    if not np.array_equal(model.classes_, np.arange(len(data.class_names))):
        raise TrainingError("training split does not contain every class; add rows")

    predicted = model.predict(x_test)
    metrics: dict[str, float | int] = {
        "accuracy": float(accuracy_score(y_test, predicted)),
        "f1_macro": float(f1_score(y_test, predicted, average="macro", zero_division=0)),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "test_size": float(test_size),
    }
    return FitResult(model, x_train, x_test, y_train, y_test, metrics)
