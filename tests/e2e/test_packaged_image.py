"""`make image MODEL_FILE=...`: the user's own fitted model, packaged inside the build.

The model is made here (a scaling Ridge pipeline on scikit-learn's diabetes
data, saved with joblib) with a reference CSV; the Dockerfile's `package`
stage runs `python -m training package` on them, so the image serves that
model, not the Iris one the default build trains, and a model that fails the
packager's checks fails the build with the packager's own line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from tests.e2e.support import IMAGE, TIMINGS, http, run, start_api_container, wait_ready

NAME = "diabetes"
VERSION = "0.9.1"
# model file, reference CSV, the fitted model, the reference rows
UserModel = tuple[Path, Path, Pipeline, pd.DataFrame]
TAG = f"{IMAGE.split(':')[0]}:{VERSION}"
REFERENCE_ROWS = 60
# The packager's regression parity tolerance: |onnx - sklearn| / max(1, |sklearn|).
RELATIVE_TOLERANCE = 1e-4


def _make_image(env: dict[str, str], **variables: str) -> Any:
    args = [f"{key}={value}" for key, value in variables.items()]
    return run(["make", "--no-print-directory", "image", *args], env=env, check=False, timeout=900)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory: pytest.TempPathFactory) -> UserModel:
    features, y = load_diabetes(return_X_y=True, as_frame=True)
    model = make_pipeline(StandardScaler(), Ridge(alpha=0.5)).fit(features, y)
    here = tmp_path_factory.mktemp("usermodel")
    model_file, reference = here / "regressor.joblib", here / "reference.csv"
    joblib.dump(model, model_file)
    rows = features.head(REFERENCE_ROWS)
    rows.assign(progression=y.head(REFERENCE_ROWS)).to_csv(reference, index=False)
    return model_file, reference, model, rows


@pytest.fixture(scope="module")
def packaged_image(base_images: dict[str, str], user_model: UserModel) -> Iterator[str]:
    model_file, reference, _, _ = user_model
    env = {**os.environ, **base_images}
    t0 = time.monotonic()
    built = _make_image(
        env,
        MODEL_FILE=str(model_file),
        REFERENCE_DATA=str(reference),
        TARGET="progression",
        NAME=NAME,
        VERSION=VERSION,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    TIMINGS["image build (packaged user model)"] = time.monotonic() - t0
    size = run(["docker", "image", "inspect", TAG, "--format", "{{.Size}}"]).stdout.strip()
    TIMINGS["image size (packaged user model)"] = f"{int(size) / 1e6:.0f} MB"
    yield TAG
    # -f: `docker stop` returns before the engine removes a --rm container,
    # which would still hold the image.
    run(["docker", "image", "rm", "-f", TAG], check=False)


@pytest.fixture(scope="module")
def packaged_api(packaged_image: str) -> Iterator[str]:
    cid, url = start_api_container(packaged_image)
    try:
        wait_ready(cid, url)
        yield url
    finally:
        run(["docker", "stop", "-t", "10", cid], check=False)


def test_packaged_image_serves_the_users_model_not_iris(
    packaged_api: str, user_model: UserModel
) -> None:
    _, _, model, rows = user_model
    info = http("GET", f"{packaged_api}/model-info").json()
    assert (info["name"], info["version"], info["task"]) == (NAME, VERSION, "regression")
    assert info["estimator_type"] == "Pipeline"
    assert [step[1] for step in info["estimator_params"]["steps"]] == [
        "StandardScaler()",
        "Ridge(alpha=0.5)",
    ]
    assert info["feature_names"] == list(rows.columns)

    instances = rows.to_dict(orient="records")
    answer = http("POST", f"{packaged_api}/predict/batch", {"instances": instances})
    assert answer.status == 200, answer.body
    served = np.array([p["prediction"] for p in answer.json()["predictions"]])
    expected = model.predict(rows)
    assert len(served) == len(expected) == REFERENCE_ROWS
    scale = np.maximum(1.0, np.abs(expected))
    assert np.max(np.abs(served - expected) / scale) <= RELATIVE_TOLERANCE

    single = http("POST", f"{packaged_api}/predict", instances[0]).json()
    assert single["model_version"] == VERSION
    assert abs(single["prediction"] - expected[0]) / max(1.0, abs(expected[0])) <= (
        RELATIVE_TOLERANCE
    )


def test_packaged_image_pins_the_packaged_pickle_and_is_labelled(packaged_image: str) -> None:
    labels = run(
        ["docker", "image", "inspect", packaged_image, "--format", "{{json .Config.Labels}}"]
    ).stdout
    assert f'"io.ml-api.model.name":"{NAME}"' in labels
    assert '"io.ml-api.model.dataset":"package:regressor.joblib"' in labels
    script = (
        "import hashlib, pathlib; "
        f"m = pathlib.Path('/app/artifacts/{NAME}/{VERSION}/model.joblib').read_bytes(); "
        "print(hashlib.sha256(m).hexdigest(), "
        "pathlib.Path('/etc/ml-api/trusted-model-sha256').read_text().split()[0])"
    )
    out = run(["docker", "run", "--rm", "--entrypoint", "python", packaged_image, "-c", script])
    actual, trusted = out.stdout.split()
    assert actual == trusted


def test_model_failing_the_packagers_checks_fails_the_build(
    base_images: dict[str, str],
    user_model: UserModel,
) -> None:
    model_file, reference, _, rows = user_model
    # The model was fitted on named columns; these names are not all its own.
    wrong = ["age", "sex", "bmi", "blood_pressure", *rows.columns[4:]]
    failed = _make_image(
        {**os.environ, **base_images},
        MODEL_FILE=str(model_file),
        REFERENCE_DATA=str(reference),
        TARGET="progression",
        FEATURES=",".join(wrong),
        NAME=NAME,
        VERSION="0.9.2",
    )
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    line = "training: error: feature names from the model's feature_names_in_ and --features differ"
    assert line in output, output[-3000:]
    assert "blood_pressure" in output
    assert run(["docker", "image", "inspect", f"{TAG.split(':')[0]}:0.9.2"], check=False).returncode


def test_a_skops_lightgbm_file_is_served_without_a_pickle_with_the_boosting_extra(
    base_images: dict[str, str], user_model: UserModel, tmp_path: Path
) -> None:
    # A .skops file (no pickle anywhere) with --no-onnx: served through LightGBM
    # itself, so the runtime needs the boosting extra and the OpenMP it links.
    lightgbm = pytest.importorskip("lightgbm")
    _, reference, _, rows = user_model
    target = pd.read_csv(reference)["progression"]
    model = lightgbm.LGBMRegressor(n_estimators=20, min_child_samples=5, verbose=-1)
    model.fit(rows, target)
    model_file = tmp_path / "lgbm.skops"
    skops_io = pytest.importorskip("skops.io")
    skops_io.dump(model, model_file)
    trusted = ",".join(skops_io.get_untrusted_types(file=model_file))
    tag = f"{TAG.split(':')[0]}:0.9.3"
    built = _make_image(
        {**os.environ, **base_images},
        MODEL_FILE=str(model_file),
        REFERENCE_DATA=str(reference),
        TARGET="progression",
        NAME="boosted",
        VERSION="0.9.3",
        PACKAGE_ARGS=f"--no-onnx --trust-skops-types {trusted}",
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    try:
        size = run(["docker", "image", "inspect", tag, "--format", "{{.Size}}"]).stdout.strip()
        TIMINGS["image size (sklearn+boosting runtime)"] = f"{int(size) / 1e6:.0f} MB"
        cid, url = start_api_container(tag)
        try:
            wait_ready(cid, url)
            runtime = run(["docker", "exec", cid, "cat", "/opt/venv/ml-api-runtime"]).stdout
            assert runtime.strip() == "sklearn+boosting"
            bundle = run(["docker", "exec", cid, "ls", "/app/artifacts/boosted/0.9.3"]).stdout
            assert "model.skops" in bundle.split()
            assert "model.joblib" not in bundle.split()
            pinned = ["docker", "exec", cid, "cat", "/etc/ml-api/trusted-model-sha256"]
            assert run(pinned).stdout.strip() == ""
            info = http("GET", f"{url}/model-info").json()
            assert (info["backend"], info["estimator_type"]) == ("sklearn", "LGBMRegressor")
            instances = rows.head(20).to_dict(orient="records")
            answer = http("POST", f"{url}/predict/batch", {"instances": instances})
            assert answer.status == 200, answer.body
            served = np.array([p["prediction"] for p in answer.json()["predictions"]])
            np.testing.assert_allclose(served, model.predict(rows.head(20)), rtol=1e-6)
        finally:
            run(["docker", "stop", "-t", "10", cid], check=False)
    finally:
        run(["docker", "image", "rm", "-f", tag], check=False)
