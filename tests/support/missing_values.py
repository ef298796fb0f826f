"""A Titanic-shaped notebook model: imputers and one-hot encoding in a
ColumnTransformer, a reference CSV with ~20% missing ages and a few missing
strings, and column names no Python identifier has. Made here, nothing downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pandas as pd

from tests.support.user_models import UserModel
from training.package import PackageConfig, package

TITANIC_NAME = "titanic"
NUMBERS = ["sepal length (cm)", "income-2023", "od280/od315_of_diluted_wines", "age", "fare"]
STRINGS = ["embarked", "sex"]
TARGET = "survived"
CLASS_NAMES = ["died", "survived"]


def titanic_frame(n: int = 400, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "sepal length (cm)": rng.uniform(4.0, 8.0, n).round(1),
            "income-2023": rng.uniform(1_000, 90_000, n).round(0),
            "od280/od315_of_diluted_wines": rng.uniform(1.2, 4.0, n).round(2),
            "age": rng.uniform(1, 80, n).round(0),
            "fare": rng.uniform(5, 300, n).round(2),
            "embarked": rng.choice(["S", "C", "Q"], n),
            "sex": rng.choice(["male", "female"], n),
        }
    )
    frame.loc[rng.random(n) < 0.2, "age"] = np.nan
    frame.loc[rng.random(n) < 0.03, "embarked"] = np.nan
    return frame


def titanic_target(frame: pd.DataFrame) -> Any:
    return (((frame["fare"] > 120) ^ (frame["sex"] == "female")) | (frame["age"] < 10)).astype(int)


def titanic_pipeline(frame: pd.DataFrame) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    prep = ColumnTransformer(
        [
            ("num", make_pipeline(SimpleImputer(), StandardScaler()), NUMBERS),
            (
                "cat",
                make_pipeline(
                    SimpleImputer(strategy="most_frequent"),
                    OneHotEncoder(handle_unknown="ignore"),
                ),
                STRINGS,
            ),
        ]
    )
    model = Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=1000))])
    return model.fit(frame, titanic_target(frame))


def write_titanic(work: Path) -> tuple[Any, pd.DataFrame]:
    """model.joblib and reference.csv (missing values kept as empty fields) in `work`."""
    frame = titanic_frame()
    model = titanic_pipeline(frame)
    work.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, work / "model.joblib")
    frame.assign(**{TARGET: titanic_target(frame)}).to_csv(work / "reference.csv", index=False)
    return model, frame


def package_titanic(work: Path, **overrides: Any) -> tuple[Any, pd.DataFrame, Path]:
    """The model, its reference rows and MODEL_DIR holding titanic/1.0.0."""
    model, frame = write_titanic(work)
    config: dict[str, Any] = {
        "model_file": work / "model.joblib",
        "name": TITANIC_NAME,
        "version": "1.0.0",
        "reference_data": work / "reference.csv",
        "target": TARGET,
        "output_dir": work / "models",
        "parity_random_rows": 200,
        "class_names": CLASS_NAMES,
        "bounds": {"fare": (0.0, None)},
        **overrides,
    }
    package(PackageConfig(**config), warn=lambda _: None)
    return model, frame, work / "models"


def plain_logistic(work: Path) -> tuple[Any, pd.DataFrame, Path]:
    """A model that cannot take NaN (no imputer), with reference data that has none."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"width (mm)": rng.uniform(1, 9, 200), "weight": rng.uniform(1, 5, 200)})
    target = (frame["width (mm)"] > frame["weight"]).astype(int)
    model = LogisticRegression().fit(frame, target)
    work.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, work / "model.joblib")
    frame.assign(label=target).to_csv(work / "reference.csv", index=False)
    return model, frame, work / "models"


def instance(row: pd.Series) -> dict[str, Any]:
    """One request body from a frame row: a missing value as JSON null."""
    return {
        name: None if pd.isna(value) else (value.item() if isinstance(value, np.generic) else value)
        for name, value in row.items()
    }


def named_titanic() -> UserModel:
    """The names model (`sepal length (cm)`, `income-2023`, `od280/od315_of_diluted_wines`)
    as a UserModel: its reference keeps the missing ages and ports."""
    frame = titanic_frame()
    model = titanic_pipeline(frame)
    return UserModel(model, frame.assign(**{TARGET: titanic_target(frame)}), TARGET, "onnx")


def assert_a_missing_weight_is_refused(client: httpx.Client, url: str) -> None:
    """plain_logistic's model cannot take NaN: a null or left-out `weight` is a
    422 naming it on /predict, and a V2 null a 400 naming it."""
    for body in ({"width (mm)": 3.0, "weight": None}, {"width (mm)": 3.0}):
        refused = client.post(f"{url}/predict", json=body)
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "weight"]
    v2 = client.post(
        f"{url}/v2/models/plain/infer",
        json={
            "inputs": [
                {"name": "features", "datatype": "FP64", "shape": [1, 2], "data": [3.0, None]}
            ]
        },
    )
    assert v2.status_code == 400
    assert "'weight'" in v2.json()["error"]
