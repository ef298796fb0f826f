"""The Titanic-shaped notebook model (imputers, one-hot, missing ages and ports,
column names like `sepal length (cm)`) under real Gunicorn workers: /predict
with null and left-out fields, /predict/batch and tritonclient's binary NaN
answer as its own predict_proba on the same rows, and the missing-value
counter is exact across workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton

from tests.support.bundles import pinned_digests
from tests.support.missing_values import (
    CLASS_NAMES,
    NUMBERS,
    STRINGS,
    TITANIC_NAME,
    assert_a_missing_weight_is_refused,
    instance,
    package_titanic,
    plain_logistic,
)
from tests.support.scrape import sample, scrape
from tests.support.servers import running_gunicorn
from training.package import PackageConfig, package

pytestmark = pytest.mark.process

WORKERS = 2
ROWS = 24
# Probabilities travel rounded to 7 decimals (JSON), or as float32 (V2).
TOLERANCE = 2e-7


@pytest.fixture(scope="module")
def titanic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, pd.DataFrame, Path]:
    return package_titanic(tmp_path_factory.mktemp("titanic"))


def _probabilities(answer: dict[str, Any]) -> list[float]:
    return [answer["probabilities"][name] for name in CLASS_NAMES]


def test_workers_answer_missing_values_as_the_notebook_model_does(
    titanic: tuple[Any, pd.DataFrame, Path], tmp_path: Path
) -> None:
    model, frame, model_dir = titanic
    # Missing ages (some with a missing port too) and complete rows.
    missing_age = frame[frame["age"].isna()]
    rows = pd.concat([missing_age, frame.drop(missing_age.index)]).head(ROWS)
    expected = np.asarray(model.predict_proba(rows), dtype=np.float64)
    n_missing_age = int(rows["age"].isna().sum())
    assert n_missing_age >= 5

    env = {"MODEL_NAME": TITANIC_NAME, "TRUSTED_MODEL_SHA256": pinned_digests(model_dir)}
    with (
        running_gunicorn(model_dir, tmp_path, workers=WORKERS, env=env) as server,
        # New connections: both workers answer.
        httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client,
    ):
        for (_, row), probabilities in zip(rows.iterrows(), expected, strict=True):
            with_null = instance(row)
            left_out = {k: v for k, v in with_null.items() if v is not None}
            for body in (with_null, left_out):
                answer = client.post(f"{server.url}/predict", json=body)
                assert answer.status_code == 200, answer.text
                assert _probabilities(answer.json()) == pytest.approx(probabilities, abs=TOLERANCE)

        batch = client.post(
            f"{server.url}/predict/batch",
            json={"instances": [instance(row) for _, row in rows.iterrows()]},
        )
        assert batch.status_code == 200, batch.text
        answers = [_probabilities(a) for a in batch.json()["predictions"]]
        assert np.asarray(answers) == pytest.approx(expected, abs=TOLERANCE)

        refused = client.post(f"{server.url}/predict", json={**instance(rows.iloc[0]), "sex": None})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "sex"]

        # tritonclient: numbers as a binary FP64 tensor with NaN for a missing age,
        # each string column a BYTES tensor (rows whose port is known).
        known_port = rows[rows["embarked"].notna()]
        triton_client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            numbers = triton.InferInput("features", [len(known_port), len(NUMBERS)], "FP64")
            numbers.set_data_from_numpy(known_port[NUMBERS].to_numpy(np.float64), binary_data=True)
            strings = []
            for column in STRINGS:
                tensor = triton.InferInput(column, [len(known_port)], "BYTES")
                tensor.set_data_from_numpy(
                    known_port[column].to_numpy(dtype=object), binary_data=False
                )
                strings.append(tensor)
            result = triton_client.infer(TITANIC_NAME, [numbers, *strings])
            metadata = triton_client.get_model_metadata(TITANIC_NAME)
        finally:
            triton_client.close()
        assert result.as_numpy("probabilities") == pytest.approx(
            model.predict_proba(known_port), abs=1e-6
        )
        assert metadata["inputs"][0]["parameters"]["feature_names"] == NUMBERS
        n_triton_missing = int(known_port["age"].isna().sum())

        labels = {"model": TITANIC_NAME, "version": "1.0.0"}
        counted = sample(
            scrape(client, server.url), "model_feature_missing_total", **labels, feature="age"
        )
        # Each missing age: null and left out on /predict, once in the batch, and
        # once from tritonclient (the refused request never reached the model).
        assert counted == 3 * n_missing_age + n_triton_missing


def test_a_model_that_cannot_take_nan_keeps_null_a_422_naming_the_field(tmp_path: Path) -> None:
    model, _, model_dir = plain_logistic(tmp_path / "plain")
    package(
        PackageConfig(
            model_file=tmp_path / "plain" / "model.joblib",
            name="plain",
            version="1.0.0",
            reference_data=tmp_path / "plain" / "reference.csv",
            target="label",
            output_dir=model_dir,
            parity_random_rows=50,
        ),
        warn=lambda _: None,
    )
    env = {"MODEL_NAME": "plain", "TRUSTED_MODEL_SHA256": pinned_digests(model_dir)}
    with (
        running_gunicorn(model_dir, tmp_path / "logs", workers=1, env=env) as server,
        httpx.Client(timeout=30) as client,
    ):
        assert_a_missing_weight_is_refused(client, server.url)
        answer = client.post(f"{server.url}/predict", json={"width (mm)": 3.0, "weight": 2.0})
        expected = model.predict_proba(pd.DataFrame([{"width (mm)": 3.0, "weight": 2.0}]))[0]
        probabilities = answer.json()["probabilities"]
        assert [probabilities["0"], probabilities["1"]] == pytest.approx(expected, abs=TOLERANCE)
