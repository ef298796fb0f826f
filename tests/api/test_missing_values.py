"""A notebook model built for missing values, packaged and served: JSON null and a
left-out field reach it as NaN (a missing string as pandas' NaN) on /predict,
/predict/batch and V2 (JSON null, binary NaN), and the answers equal its own
predict_proba on the same rows; a feature that is not nullable still answers 422."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings
from tests.support.bundles import pinned_digests
from tests.support.missing_values import (
    CLASS_NAMES,
    NUMBERS,
    STRINGS,
    TITANIC_NAME,
    instance,
    package_titanic,
    plain_logistic,
)
from tests.support.scrape import parse_samples, sample
from tests.support.v2 import HEADER_LENGTH, read_response
from training.errors import TrainingError
from training.package import PackageConfig, package

ROWS = 40
# Probabilities travel rounded to 7 decimals.
TOLERANCE = 2e-7
INFER = f"/v2/models/{TITANIC_NAME}/infer"


@pytest.fixture(scope="module")
def titanic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, pd.DataFrame, Path]:
    return package_titanic(tmp_path_factory.mktemp("titanic"))


def _client(model_dir: Path, name: str) -> TestClient:
    settings = ServiceSettings(
        model_dir=model_dir,
        model_name=name,
        trusted_model_sha256=pinned_digests(model_dir),
        auth="off",
        api_keys_file=model_dir / "no-api-keys",
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def served(titanic: tuple[Any, pd.DataFrame, Path]) -> Iterator[TestClient]:
    with _client(titanic[2], TITANIC_NAME) as client:
        yield client


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a missing age or a missing port first, then complete ones."""
    missing = frame[frame["age"].isna() | frame["embarked"].isna()]
    return pd.concat([missing, frame.drop(missing.index)]).head(ROWS)


def _expected(model: Any, rows: pd.DataFrame) -> np.ndarray[Any, Any]:
    return np.asarray(model.predict_proba(rows), dtype=np.float64)


def _probabilities(answer: dict[str, Any]) -> list[float]:
    return [answer["probabilities"][name] for name in CLASS_NAMES]


def test_null_and_left_out_fields_answer_as_the_model_does_on_nan(
    served: TestClient, titanic: tuple[Any, pd.DataFrame, Path]
) -> None:
    model, frame, _ = titanic
    rows = _rows(frame)
    assert rows["age"].isna().any()
    assert rows["embarked"].isna().any()
    expected = _expected(model, rows)
    for (_, row), probabilities in zip(rows.iterrows(), expected, strict=True):
        with_null = instance(row)
        left_out = {k: v for k, v in with_null.items() if v is not None}
        for body in (with_null, left_out):
            response = served.post("/predict", json=body)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert _probabilities(answer) == pytest.approx(probabilities, abs=TOLERANCE)
            assert answer["predicted_class_name"] == CLASS_NAMES[int(probabilities.argmax())]


def test_a_batch_with_missing_values_answers_every_row_as_the_model_does(
    served: TestClient, titanic: tuple[Any, pd.DataFrame, Path]
) -> None:
    model, frame, _ = titanic
    rows = _rows(frame)
    instances = [instance(row) for _, row in rows.iterrows()]
    instances[1] = {k: v for k, v in instances[1].items() if v is not None}
    response = served.post("/predict/batch", json={"instances": instances})
    assert response.status_code == 200, response.text
    answers = [_probabilities(a) for a in response.json()["predictions"]]
    assert np.asarray(answers) == pytest.approx(_expected(model, rows), abs=TOLERANCE)


@pytest.mark.parametrize(("value", "error_type"), [(None, "float_type"), ("left out", "missing")])
def test_a_feature_that_is_not_nullable_still_names_itself_in_a_422(
    served: TestClient, titanic: tuple[Any, pd.DataFrame, Path], value: Any, error_type: str
) -> None:
    body = instance(titanic[1].iloc[0])
    if value == "left out":
        del body["fare"]
    else:
        body["fare"] = value
    for response in (
        served.post("/predict", json=body),
        served.post("/predict/batch", json={"instances": [instance(titanic[1].iloc[1]), body]}),
    ):
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"][-1] == "fare"
        assert error["type"] == error_type


def test_declared_bounds_refuse_and_the_reference_range_only_counts(served: TestClient) -> None:
    body = {
        "sepal length (cm)": 5.0,
        "income-2023": 10.0,  # below every reference income: accepted, counted
        "od280/od315_of_diluted_wines": 2.0,
        "age": None,
        "fare": 0.0,  # below every reference fare, inside the declared fare >= 0
        "embarked": None,
        "sex": "male",
    }
    assert served.post("/predict", json=body).status_code == 200
    refused = served.post("/predict", json={**body, "fare": -1.0})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "fare"]
    samples = parse_samples(served.get("/metrics").text)
    labels = {"model": TITANIC_NAME, "version": "1.0.0"}
    assert sample(samples, "model_feature_missing_total", **labels, feature="age") >= 1
    assert sample(samples, "model_feature_missing_total", **labels, feature="embarked") >= 1
    assert not sample(samples, "model_feature_missing_total", **labels, feature="sex")
    for feature in ("income-2023", "fare"):
        counted = sample(samples, "model_feature_out_of_range_total", **labels, feature=feature)
        assert counted >= 1, feature


def test_openapi_names_every_field_as_the_column_and_says_which_take_null(
    served: TestClient,
) -> None:
    document = served.get("/openapi.json").json()
    schema = document["components"]["schemas"]["TitanicInstance"]
    assert list(schema["properties"]) == [*NUMBERS, *STRINGS]
    assert set(schema["required"]) == {
        "sepal length (cm)",
        "income-2023",
        "od280/od315_of_diluted_wines",
        "fare",
        "sex",
    }
    age = schema["properties"]["age"]
    assert {"type": "null"} in age["anyOf"]
    assert schema["properties"]["sepal length (cm)"]["title"] == "sepal length (cm)"


def _v2_body(rows: pd.DataFrame) -> dict[str, Any]:
    numbers = [[None if pd.isna(v) else float(v) for v in row] for row in rows[NUMBERS].values]
    return {
        "inputs": [
            {"name": "features", "datatype": "FP64", "shape": [len(rows), 5], "data": numbers},
            *(
                {
                    "name": column,
                    "datatype": "BYTES",
                    "shape": [len(rows)],
                    "data": [None if pd.isna(v) else v for v in rows[column]],
                }
                for column in STRINGS
            ),
        ]
    }


def test_v2_json_null_is_a_missing_value(
    served: TestClient, titanic: tuple[Any, pd.DataFrame, Path]
) -> None:
    model, frame, _ = titanic
    rows = _rows(frame)
    response = served.post(INFER, json=_v2_body(rows))
    assert response.status_code == 200, response.text
    outputs = read_response(response.content, response.headers.get(HEADER_LENGTH))
    probabilities = np.asarray(outputs["outputs"]["probabilities"], dtype=np.float64).reshape(-1, 2)
    assert probabilities == pytest.approx(_expected(model, rows), abs=1e-6)


def test_v2_binary_nan_is_a_missing_value(
    served: TestClient, titanic: tuple[Any, pd.DataFrame, Path]
) -> None:
    model, frame, _ = titanic
    rows = _rows(frame)
    numbers = rows[NUMBERS].to_numpy(dtype="<f8")
    raw = numbers.tobytes()
    body = _v2_body(rows)
    body["inputs"][0] = {
        "name": "features",
        "datatype": "FP64",
        "shape": list(numbers.shape),
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps(body).encode()
    response = served.post(INFER, content=header + raw, headers={HEADER_LENGTH: str(len(header))})
    assert response.status_code == 200, response.text
    outputs = read_response(response.content, response.headers.get(HEADER_LENGTH))
    probabilities = np.asarray(outputs["outputs"]["probabilities"], dtype=np.float64).reshape(-1, 2)
    assert probabilities == pytest.approx(_expected(model, rows), abs=1e-6)


def test_v2_refuses_a_missing_value_where_the_feature_is_not_nullable(
    served: TestClient, titanic: tuple[Any, pd.DataFrame, Path]
) -> None:
    rows = _rows(titanic[1]).head(2)
    body = _v2_body(rows)
    body["inputs"][0]["data"][1][NUMBERS.index("fare")] = None
    response = served.post(INFER, json=body)
    assert response.status_code == 400
    assert "fare" in response.json()["error"]
    sexes = _v2_body(rows)
    sexes["inputs"][2]["data"][0] = None
    refused = served.post(INFER, json=sexes)
    assert refused.status_code == 400
    assert "sex" in refused.json()["error"]
    # The empty string is not a missing value: only a category the model saw.
    ports = _v2_body(rows)
    ports["inputs"][1]["data"][0] = ""
    assert served.post(INFER, json=ports).status_code == 400


def test_v2_metadata_lists_feature_names_nullability_and_categories(served: TestClient) -> None:
    metadata = served.get(f"/v2/models/{TITANIC_NAME}").json()
    features, embarked, sex = metadata["inputs"]
    assert features["parameters"] == {
        "feature_names": NUMBERS,
        "nullable": [False, False, False, True, False],
    }
    assert embarked["parameters"]["nullable"] == [True]
    assert sorted(embarked["parameters"]["categories"]) == ["C", "Q", "S"]
    assert sex["parameters"]["nullable"] == [False]
    assert metadata["properties"]["feature_names"] == [*NUMBERS, *STRINGS]
    assert metadata["properties"]["classes"] == CLASS_NAMES


def test_a_model_that_cannot_take_nan_keeps_null_a_422_and_is_refused_as_nullable(
    tmp_path: Path,
) -> None:
    model, _frame, model_dir = plain_logistic(tmp_path)
    config = PackageConfig(
        model_file=tmp_path / "model.joblib",
        name="plain",
        version="1.0.0",
        reference_data=tmp_path / "reference.csv",
        target="label",
        output_dir=model_dir,
        parity_random_rows=50,
    )
    with pytest.raises(TrainingError) as refused:
        package(PackageConfig(**{**config.__dict__, "nullable": ["weight"]}), lambda _: None)
    message = str(refused.value)
    assert message.startswith("feature 'weight' is nullable but the model fails on a missing")
    assert "NaN" in message
    assert "\n" not in message
    gappy = tmp_path / "gappy.csv"
    lines = (tmp_path / "reference.csv").read_text().splitlines()
    width, _, label = lines[1].split(",")
    gappy.write_text("\n".join([lines[0], f"{width},,{label}", *lines[2:]]) + "\n")
    with pytest.raises(TrainingError, match=r"^feature 'weight' is nullable but the model fails"):
        package(PackageConfig(**{**config.__dict__, "reference_data": gappy}), lambda _: None)
    package(config, lambda _: None)
    with _client(model_dir, "plain") as client:
        body = {"width (mm)": 3.0, "weight": None}
        response = client.post("/predict", json=body)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "weight"]
        answer = client.post("/predict", json={**body, "weight": 2.0}).json()
        expected = model.predict_proba(pd.DataFrame([{"width (mm)": 3.0, "weight": 2.0}]))[0]
        assert [answer["probabilities"][c] for c in ("0", "1")] == pytest.approx(expected, abs=1e-6)


def test_a_renamed_column_is_sent_by_its_api_name_and_reaches_the_model_by_its_own(
    tmp_path: Path,
) -> None:
    rename = {"sepal length (cm)": "sepal_length", "income-2023": "income"}
    model, frame, model_dir = package_titanic(tmp_path, rename=rename)
    row = frame.iloc[0]
    body = {rename.get(k, k): v for k, v in instance(row).items()}
    with _client(model_dir, TITANIC_NAME) as client:
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200, answer.text
        expected = model.predict_proba(frame.head(1))[0]
        assert _probabilities(answer.json()) == pytest.approx(expected, abs=TOLERANCE)
        old = client.post("/predict", json=instance(row))
        assert old.status_code == 422
        assert {tuple(e["loc"][1:]) for e in old.json()["detail"]} >= {
            ("sepal length (cm)",),
            ("sepal_length",),
        }
        metadata = client.get(f"/v2/models/{TITANIC_NAME}").json()
        assert metadata["properties"]["feature_names"][:2] == ["sepal_length", "income"]
        info = client.get("/model-info").json()
        assert info["feature_names"][:2] == ["sepal_length", "income"]
        assert [f["name"] for f in info["features"]][:2] == list(rename)
