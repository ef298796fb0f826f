"""A user's own model for tests: fitted here on synthetic data, packaged by the real packager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

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
        ),
        warn=lambda _: None,
    )
    return work / "models"
