"""A user's own model for tests: fitted here on synthetic data, packaged by the real packager."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest

from service.manifest import CategoryFeature, Manifest
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
    skops: bool = False  # saved with skops.io.dump rather than joblib.dump

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


def passengers(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Titanic-shaped rows: ~20% of ages and a few embarkation ports missing
    (NaN, as pandas reads empty CSV fields), and who survived."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "pclass": rng.integers(1, 4, n),
            "age": rng.uniform(1, 80, n).round(1),
            "fare": rng.exponential(30, n).round(2) + 1,
            "sex": rng.choice(["male", "female"], n),
            "embarked": rng.choice(["S", "C", "Q"], n, p=[0.7, 0.2, 0.1]),
        }
    )
    frame.loc[rng.random(n) < 0.2, "age"] = np.nan
    frame.loc[rng.random(n) < 0.05, "embarked"] = np.nan
    odds = (frame.sex == "female") * 2.0 - frame.pclass * 0.6 - frame.age.fillna(30) / 40
    survived = (odds + rng.normal(0, 0.5, n) > -0.8).astype(int).to_numpy()
    return frame, survived


def titanic_pipeline(final: Any) -> Any:
    """The notebook pipeline: median-imputed scaled numbers, most-frequent-imputed
    one-hot strings (whose missing value is NaN), then `final`."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numbers = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    strings = Pipeline(
        [
            ("impute", SimpleImputer(strategy="most_frequent")),
            ("onehot", OneHotEncoder(handle_unknown="ignore")),
        ]
    )
    prep = ColumnTransformer(
        [("num", numbers, ["pclass", "age", "fare"]), ("cat", strings, ["sex", "embarked"])]
    )
    return Pipeline([("prep", prep), ("model", final)])


def titanic_logistic_regression() -> UserModel:
    from sklearn.linear_model import LogisticRegression

    frame, survived = passengers()
    model = titanic_pipeline(LogisticRegression()).fit(frame, survived)
    return UserModel(model, frame.assign(survived=survived), "survived", "onnx")


def titanic_random_forest() -> UserModel:
    from sklearn.ensemble import RandomForestClassifier

    frame, survived = passengers()
    forest = RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0)
    model = titanic_pipeline(forest).fit(frame, survived)
    # ONNX scales a float32 input in float32, scikit-learn a float64 one before
    # its trees cast to float32: a few reference rows land across a threshold,
    # and the gate refuses the graph.
    return UserModel(model, frame.assign(survived=survived), "survived", "sklearn")


def _numbers_with_nan(n: int = 600, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Five numeric columns with 10% of the values NaN, and a label."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    label = (x[:, 0] + x[:, 1] ** 2 > 1).astype(int)
    x[rng.random(x.shape) < 0.1] = np.nan
    return x, label


def xgboost_with_nan() -> UserModel:
    """XGBoost fitted on a bare array with 10% NaN (its default missing value)."""
    xgboost = pytest.importorskip("xgboost")
    x, label = _numbers_with_nan()
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3).fit(x, label)
    names = [f"x{j}" for j in range(x.shape[1])]
    reference = pd.DataFrame(x, columns=names).assign(label=label)
    return UserModel(model, reference, "label", "onnx", features=names)


COLORS = ("red", "green", "blue")


def _colored(n: int = 600, seed: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """Two numbers (10% NaN in the first) and a pandas `category` column."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "size": rng.normal(size=n),
            "weight": rng.normal(size=n),
            "color": pd.Categorical(rng.choice(list(COLORS), n), categories=list(COLORS)),
        }
    )
    frame.loc[rng.random(n) < 0.1, "size"] = np.nan
    label = ((frame["size"].fillna(0) > 0) ^ (frame.color == "red")).astype(int).to_numpy()
    return frame, label


def lightgbm_with_category() -> UserModel:
    """LightGBM's default categorical handling of a pandas `category` column."""
    lightgbm = pytest.importorskip("lightgbm")
    frame, label = _colored()
    model = lightgbm.LGBMClassifier(n_estimators=20, verbose=-1).fit(frame, label)
    return UserModel(model, frame.assign(label=label), "label", "onnx")


def xgboost_with_category() -> UserModel:
    """XGBoost's enable_categorical on a pandas `category` column (its categories
    not in alphabetical order: the model's own order is the one that counts)."""
    xgboost = pytest.importorskip("xgboost")
    frame, label = _colored()
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3, enable_categorical=True)
    return UserModel(model.fit(frame, label), frame.assign(label=label), "label", "onnx")


def hist_gradient_boosting_native() -> UserModel:
    """HistGradientBoosting with NaN and categorical_features="from_dtype"."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    frame, label = _colored()
    model = HistGradientBoostingClassifier(
        max_iter=20, categorical_features="from_dtype", random_state=0
    ).fit(frame, label)
    return UserModel(model, frame.assign(label=label), "label", "sklearn")


def titanic_skops() -> UserModel:
    """The Titanic pipeline saved as a .skops file, as scikit-learn's docs advise."""
    pytest.importorskip("skops")
    return dataclasses.replace(titanic_logistic_regression(), skops=True)


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
    "titanic_logistic_regression": titanic_logistic_regression,
    "titanic_random_forest": titanic_random_forest,
    "xgboost_with_nan": xgboost_with_nan,
    "lightgbm_with_category": lightgbm_with_category,
    "xgboost_with_category": xgboost_with_category,
    "hist_gradient_boosting_native": hist_gradient_boosting_native,
    "titanic_skops": titanic_skops,
}


def package_user_model(
    key: str,
    work: Path,
    parity_random_rows: int | None = None,
    nullable: Sequence[str] = (),
    keep_missing: bool = False,
) -> tuple[UserModel, Path]:
    """Fit BUILDERS[key], save it as a user would, and package it with its
    reference data into work/models (`nullable` as --nullable); returns the
    model and the bundle path."""
    user = BUILDERS[key]()
    model_file, trusted = save_model(user, work)
    # Complete reference rows unless keep_missing: no feature is nullable then,
    # and callers hand rows with NaN to the backends directly. Kept, a feature
    # missing somewhere is nullable and the gate's random rows leave it missing
    # too (tests/process/test_make_package_serve.py packages from such a CSV).
    reference = user.reference if keep_missing else user.reference.dropna()
    reference.to_csv(work / "reference.csv", index=False)
    config = PackageConfig(
        model_file=model_file,
        name=key.replace("_", "-"),
        version="1.0.0",
        reference_data=work / "reference.csv",
        target=user.target,
        features=user.features,
        output_dir=work / "models",
        trust_skops_types=trusted,
        nullable=nullable,
    )
    if parity_random_rows is not None:
        config = dataclasses.replace(config, parity_random_rows=parity_random_rows)
    return user, package(config, warn=lambda _: None)


def save_model(user: UserModel, work: Path) -> tuple[Path, tuple[str, ...]]:
    """The model file as its user saved it, and the skops types they would confirm."""
    if not user.skops:
        joblib.dump(user.model, work / "model.joblib")
        return work / "model.joblib", ()
    import skops.io

    skops.io.dump(user.model, work / "model.skops")
    return work / "model.skops", tuple(skops.io.get_untrusted_types(file=work / "model.skops"))


def backend_rows(manifest: Manifest, frame: pd.DataFrame) -> np.ndarray:
    """Rows as the service hands them to a backend: numbers as floats, a category
    as the index of its value, a missing value as NaN."""
    columns = []
    for feature, name in zip(manifest.features, frame.columns, strict=True):
        values = frame[name].astype(object)
        if isinstance(feature, CategoryFeature):
            index = {c: i for i, c in enumerate(feature.categories)}
            columns.append([np.nan if pd.isna(v) else index[str(v)] for v in values])
        else:
            columns.append([np.nan if pd.isna(v) else float(v) for v in values])
    return np.asarray(columns, dtype=np.float64).T
