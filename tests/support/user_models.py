"""A user's own model for tests: fitted here on synthetic data, packaged by the real packager."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest

from training.package import PackageConfig, package

MIXED_NAME = "flats"
CITIES = ("paris", "lyon", "nice")


def mixed_frame(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """An integer, a number and a text column: every feature kind at once."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "rooms": rng.integers(1, 8, n),
            "area": rng.uniform(20, 200, n).round(1),
            "city": rng.choice(list(CITIES), n),
        }
    )


def mixed_regressor() -> tuple[Any, pd.DataFrame]:
    """Ridge after a ColumnTransformer that one-hot-encodes the city: a rent predictor."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = mixed_frame()
    rent = 12.0 * frame.area + 50.0 * frame.rooms + (frame.city == "paris") * 400.0
    prepare = ColumnTransformer(
        [
            ("numbers", StandardScaler(), ["rooms", "area"]),
            ("city", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    )
    model = Pipeline([("prepare", prepare), ("model", Ridge())]).fit(frame, rent)
    return model, frame.assign(rent=rent)


def package_mixed_regressor(work: Path) -> Path:
    """MODEL_DIR holding flats/1.0.0; returns the model directory."""
    model, reference = mixed_regressor()
    work.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, work / "model.joblib")
    reference.to_csv(work / "reference.csv", index=False)
    package(
        PackageConfig(
            model_file=work / "model.joblib",
            name=MIXED_NAME,
            version="1.0.0",
            reference_data=work / "reference.csv",
            target="rent",
            output_dir=work / "models",
            parity_random_rows=500,
            # The reference range refuses as it did before schema 3 (rooms > 0).
            strict_bounds=True,
        ),
        warn=lambda _: None,
    )
    return work / "models"


@dataclass(frozen=True)
class UserModel:
    model: Any
    reference: pd.DataFrame  # features, then the target column
    target: str
    expected_backend: str
    features: list[str] | None = None  # --features, for a model fitted without names

    @property
    def x(self) -> pd.DataFrame:
        return self.reference.drop(columns=self.target)


def _iris() -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    from sklearn.datasets import load_iris

    data = load_iris()
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    frame = pd.DataFrame(data.data, columns=names)
    return frame, data.target, [str(n) for n in data.target_names]


def article_forest() -> UserModel:
    """The source article's model: a forest fitted on unnamed columns, integer classes."""
    from sklearn.ensemble import RandomForestClassifier

    frame, target, names = _iris()
    model = RandomForestClassifier(n_estimators=15, random_state=0).fit(frame.to_numpy(), target)
    reference = frame.assign(species=[names[t] for t in target])
    return UserModel(model, reference, "species", "onnx", features=list(frame.columns))


def scaled_logistic_regression() -> UserModel:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame, target, _ = _iris()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(frame, target)
    return UserModel(model, frame.assign(label=target), "label", "onnx")


def custom_function_pipeline() -> UserModel:
    """A step ONNX cannot express (an arbitrary Python function): served by sklearn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    frame, target, _ = _iris()
    model = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression(max_iter=500))
    return UserModel(model.fit(frame, target), frame.assign(label=target), "label", "sklearn")


def hist_gradient_boosting_classifier() -> UserModel:
    from sklearn.ensemble import HistGradientBoostingClassifier

    frame, target, _ = _iris()
    model = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(frame, target)
    return UserModel(model, frame.assign(label=target), "label", "onnx")


def _diabetes() -> tuple[pd.DataFrame, np.ndarray]:
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False, as_frame=True)
    return data.data, data.target.to_numpy()


def forest_regressor() -> UserModel:
    from sklearn.ensemble import RandomForestRegressor

    frame, target = _diabetes()
    model = RandomForestRegressor(n_estimators=10, max_depth=6, random_state=0)
    return UserModel(
        model.fit(frame, target), frame.assign(progression=target), "progression", "onnx"
    )


def hist_gradient_boosting_regressor() -> UserModel:
    from sklearn.ensemble import HistGradientBoostingRegressor

    frame, target = _diabetes()
    model = HistGradientBoostingRegressor(max_iter=20, random_state=0).fit(frame, target)
    return UserModel(model, frame.assign(progression=target), "progression", "onnx")


def ridge() -> UserModel:
    from sklearn.linear_model import Ridge

    frame, target = _diabetes()
    model = Ridge().fit(frame, target)
    return UserModel(model, frame.assign(progression=target), "progression", "onnx")


def xgboost_classifier() -> UserModel:
    xgboost = pytest.importorskip("xgboost")
    frame, target, _ = _iris()
    # Fitted on a DataFrame: the booster keeps column names onnxmltools cannot read.
    model = xgboost.XGBClassifier(n_estimators=10, max_depth=3).fit(frame, target)
    return UserModel(model, frame.assign(label=target), "label", "onnx")


def lightgbm_regressor() -> UserModel:
    lightgbm = pytest.importorskip("lightgbm")
    frame, target = _diabetes()
    model = lightgbm.LGBMRegressor(n_estimators=20, verbose=-1).fit(frame, target)
    return UserModel(model, frame.assign(progression=target), "progression", "onnx")


def one_hot_pipeline() -> UserModel:
    """A ColumnTransformer with a one-hot-encoded text column and an integer column."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(0)
    n = 240
    frame = pd.DataFrame(
        {
            "rooms": rng.integers(1, 8, n),
            "area": rng.uniform(20, 200, n).round(1),
            "city": rng.choice(["paris", "lyon", "nice"], n),
        }
    )
    label = np.where(frame.area / frame.rooms + (frame.city == "paris") * 20 > 45, "dear", "cheap")
    prepare = ColumnTransformer(
        [
            ("numbers", StandardScaler(), ["rooms", "area"]),
            ("city", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    )
    model = Pipeline([("prepare", prepare), ("model", LogisticRegression())]).fit(frame, label)
    return UserModel(model, frame.assign(price=label), "price", "onnx")


BUILDERS: dict[str, Callable[[], UserModel]] = {
    "article_forest": article_forest,
    "scaled_logistic_regression": scaled_logistic_regression,
    "custom_function_pipeline": custom_function_pipeline,
    "hist_gradient_boosting_classifier": hist_gradient_boosting_classifier,
    "forest_regressor": forest_regressor,
    "hist_gradient_boosting_regressor": hist_gradient_boosting_regressor,
    "ridge": ridge,
    "xgboost_classifier": xgboost_classifier,
    "lightgbm_regressor": lightgbm_regressor,
    "one_hot_pipeline": one_hot_pipeline,
}


def package_user_model(
    key: str, work: Path, parity_random_rows: int | None = None
) -> tuple[UserModel, Path]:
    """Fit BUILDERS[key], save it as a user would, and package it with its
    reference data into work/models; returns the model and the bundle path."""
    user = BUILDERS[key]()
    joblib.dump(user.model, work / "model.joblib")
    user.reference.to_csv(work / "reference.csv", index=False)
    config = PackageConfig(
        model_file=work / "model.joblib",
        name=key.replace("_", "-"),
        version="1.0.0",
        reference_data=work / "reference.csv",
        target=user.target,
        features=user.features,
        output_dir=work / "models",
    )
    if parity_random_rows is not None:
        config = dataclasses.replace(config, parity_random_rows=parity_random_rows)
    return user, package(config, warn=lambda _: None)
