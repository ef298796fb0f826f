"""`make package` then `make serve MODEL_NAME=...`, nothing in between, for each
notebook-style model issue 17 names: packaged from a reference CSV that keeps its
missing values, served under real Gunicorn, and answering /predict (null and
left-out fields), /predict/batch and V2 (tritonclient's binary FP32 with NaN,
JSON null) exactly as the model's own predict_proba on the same rows with NaN.
A model that cannot take NaN keeps null a 422 naming the field."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton

from tests.support.bundles import REPO, model_sha256
from tests.support.missing_values import (
    assert_a_missing_weight_is_refused,
    instance,
    named_titanic,
    plain_logistic,
)
from tests.support.servers import free_port, ready, wait_for
from tests.support.user_models import (
    UserModel,
    hist_gradient_boosting_native,
    lightgbm_with_category,
    save_model,
    titanic_logistic_regression,
    titanic_random_forest,
    titanic_skops,
    xgboost_with_category,
    xgboost_with_nan,
)

pytestmark = pytest.mark.process

# Rows sent per model: those with a missing value first, then complete ones.
ROWS = 8
# ONNX computes in float32; JSON probabilities travel rounded to 7 decimals.
TOLERANCE = 1e-5

# The virtualenv running the tests: make uses it as is (-o: never reinstalls it).
VENV = Path(sys.executable).parent.parent


def make(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                f"VENV={VENV}",
                "-o",
                f"{VENV}/bin/.installed",
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], UserModel]
    backend: str


CASES = [
    Case("titanic-lr", titanic_logistic_regression, "onnx"),
    Case("titanic-forest", titanic_random_forest, "sklearn"),
    Case("xgboost-nan", xgboost_with_nan, "onnx"),
    Case("lightgbm-category", lightgbm_with_category, "onnx"),
    Case("xgboost-category", xgboost_with_category, "onnx"),
    Case("hgb-native", hist_gradient_boosting_native, "sklearn"),
    Case("odd-names", named_titanic, "onnx"),
    Case("titanic-skops", titanic_skops, "onnx"),
]


def _environment(tmp_path: Path, port: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"TRUSTED_MODEL_SHA256", "BACKEND", "MODEL_VERSION", "BIND"}
    }
    return env | {
        "MODEL_DIR": str(tmp_path / "models"),
        "TRUSTED_DIGESTS_FILE": str(tmp_path / "etc" / "trusted-model-sha256"),
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }


def make_package(
    tmp_path: Path, env: dict[str, str], name: str, model_file: Path, target: str, *args: str
) -> str:
    """`make package` of model_file with tmp_path/reference.csv; its output."""
    packaging = make(
        "package",
        f"MODEL_FILE={model_file}",
        f"NAME={name}",
        "VERSION=1.0.0",
        f"REFERENCE_DATA={tmp_path / 'reference.csv'}",
        f"TARGET={target}",
        f"PACKAGE_ARGS=--parity-random-rows 200 {' '.join(args)}",
        env=env,
        log=tmp_path / "package.log",
    )
    assert packaging.wait(timeout=300) == 0, (tmp_path / "package.log").read_text()
    return (tmp_path / "package.log").read_text()


@contextmanager
def make_serve(tmp_path: Path, env: dict[str, str], name: str) -> Iterator[str]:
    """`make serve MODEL_NAME=name` until the block ends; its URL."""
    server = make("serve", f"MODEL_NAME={name}", env=env, log=tmp_path / "serve.log")
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        try:
            wait_for(lambda: ready(url), 120, what="make serve")
        except TimeoutError:
            pytest.fail((tmp_path / "serve.log").read_text())
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    incomplete = frame[frame.isna().any(axis=1)]
    return pd.concat([incomplete.head(ROWS // 2), frame.dropna().head(ROWS - ROWS // 2)])


def _model_input(user: UserModel, frame: pd.DataFrame) -> Any:
    """What the model was fitted on: a bare array when it was fitted without names."""
    return frame.to_numpy() if user.features is not None else frame


def _probabilities(answer: dict[str, Any], classes: list[str]) -> list[float]:
    return [answer["probabilities"][name] for name in classes]


def _v2_inputs(metadata: dict[str, Any], rows: pd.DataFrame) -> list[Any]:
    """tritonclient inputs built from the served metadata: numbers as FP32 with NaN,
    each category or string column a BYTES tensor."""
    inputs = []
    for spec in metadata["inputs"]:
        names = spec["parameters"]["feature_names"]
        if spec["datatype"] == "BYTES":
            (name,) = names
            tensor = triton.InferInput(spec["name"], [len(rows)], "BYTES")
            tensor.set_data_from_numpy(rows[name].astype(str).to_numpy(dtype=object))
        else:
            tensor = triton.InferInput(spec["name"], [len(rows), len(names)], "FP32")
            tensor.set_data_from_numpy(
                rows[names].to_numpy(np.float32, na_value=np.nan), binary_data=True
            )
        inputs.append(tensor)
    return inputs


def _v2_json_body(metadata: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    """A V2 JSON request whose missing numbers are JSON null."""
    inputs = []
    for spec in metadata["inputs"]:
        names = spec["parameters"]["feature_names"]
        values = rows[names].astype(object).to_numpy()
        data = [
            None if pd.isna(v) else (str(v) if spec["datatype"] == "BYTES" else float(v))
            for v in values.ravel()
        ]
        if spec["datatype"] == "BYTES":
            shape, datatype = [len(rows)], "BYTES"
        else:
            shape, datatype = [len(rows), len(names)], "FP64"
        inputs.append({"name": spec["name"], "datatype": datatype, "shape": shape, "data": data})
    return {"inputs": inputs}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_packaged_model_serves_its_missing_values_as_it_predicts(
    case: Case, tmp_path: Path
) -> None:
    user = case.build()
    model_file, trusted = save_model(user, tmp_path)
    # pandas writes a missing value as an empty field: the CSV keeps them.
    user.reference.to_csv(tmp_path / "reference.csv", index=False)
    assert user.reference.isna().any().any()
    args = []
    if user.features is not None:
        args.append(f"--features {','.join(user.features)}")
    if trusted:
        args.append(f"--trust-skops-types {','.join(trusted)}")
    env = _environment(tmp_path, free_port())
    output = make_package(tmp_path, env, case.name, model_file, user.target, *args)
    bundle = tmp_path / "models" / case.name / "1.0.0"
    if user.skops:
        # skops' safe loader runs no code from the file: no digest to record.
        assert "nothing to pin" in output
    else:
        digest = model_sha256(bundle)
        assert f"trusted: model.joblib sha256 {digest} recorded in " in output

    frame = _rows(user.x)
    assert frame.isna().any(axis=1).sum() == ROWS // 2
    expected = user.model.predict_proba(_model_input(user, frame))
    classes = [str(c) for c in user.model.classes_]
    # tritonclient rows: every string or category known (its BYTES tensors carry
    # no null), numbers missing; sent as float32, so the model is asked on
    # float32 values too.
    numbers = list(frame.select_dtypes("number").columns)
    v2_rows = frame[frame.drop(columns=numbers).notna().all(axis=1)]
    assert v2_rows[numbers].isna().any().any()
    v2_frame = v2_rows.astype(dict.fromkeys(numbers, np.float32)).astype(
        dict.fromkeys(numbers, np.float64)
    )
    v2_expected = user.model.predict_proba(_model_input(user, v2_frame))

    with make_serve(tmp_path, env, case.name) as url, httpx.Client(timeout=30) as client:
        info = client.get(f"{url}/model-info").json()
        assert info["backend"] == case.backend, info
        parity = info["parity"]
        if case.backend == "onnx":
            # The gate ran, on random rows with the nullable features missing too.
            assert parity["passed"], parity
            assert parity["random_rows"] > 0, parity
        else:
            # The one-line reason names what kept ONNX out, and what a row costs.
            assert "µs/row" in (parity["reason"] or ""), parity
        for (_, row), probabilities in zip(frame.iterrows(), expected, strict=True):
            with_null = instance(row)
            left_out = {k: v for k, v in with_null.items() if v is not None}
            for body in (with_null, left_out):
                answer = client.post(f"{url}/predict", json=body)
                assert answer.status_code == 200, answer.text
                served = _probabilities(answer.json(), classes)
                np.testing.assert_allclose(served, probabilities, atol=TOLERANCE)

        batch = client.post(
            f"{url}/predict/batch", json={"instances": [instance(r) for _, r in frame.iterrows()]}
        )
        assert batch.status_code == 200, batch.text
        batch_served = [_probabilities(a, classes) for a in batch.json()["predictions"]]
        np.testing.assert_allclose(batch_served, expected, atol=TOLERANCE)

        triton_client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            metadata = triton_client.get_model_metadata(case.name)
            result = triton_client.infer(case.name, _v2_inputs(metadata, v2_rows))
        finally:
            triton_client.close()
        # JSON carries null in any tensor, strings and categories too: every row.
        v2_json = client.post(
            f"{url}/v2/models/{case.name}/infer", json=_v2_json_body(metadata, frame)
        )
        assert v2_json.status_code == 200, v2_json.text
    np.testing.assert_allclose(result.as_numpy("probabilities"), v2_expected, atol=TOLERANCE)
    (output,) = (o for o in v2_json.json()["outputs"] if o["name"] == "probabilities")
    served_json = np.reshape(output["data"], output["shape"])
    np.testing.assert_allclose(served_json, expected, atol=TOLERANCE)


def test_a_model_that_cannot_take_nan_keeps_null_a_422_naming_the_field(tmp_path: Path) -> None:
    model, _, _ = plain_logistic(tmp_path)
    env = _environment(tmp_path, free_port())
    make_package(tmp_path, env, "plain", tmp_path / "model.joblib", "label")
    row = {"width (mm)": 3.0, "weight": 2.0}
    with make_serve(tmp_path, env, "plain") as url, httpx.Client(timeout=30) as client:
        assert_a_missing_weight_is_refused(client, url)
        answer = client.post(f"{url}/predict", json=row)
    expected = model.predict_proba(pd.DataFrame([row]))[0]
    np.testing.assert_allclose(_probabilities(answer.json(), ["0", "1"]), expected, atol=TOLERANCE)
