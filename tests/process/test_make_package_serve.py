"""`make package` then `make serve MODEL_NAME=...`, nothing in between: a LightGBM
model with a pandas `category` column (sklearn-only, so its pickle must be
trusted) answers under real Gunicorn exactly as the model predicts on a
DataFrame with that dtype."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import joblib
import numpy as np
import pandas as pd
import pytest

from tests.support.bundles import REPO, model_sha256
from tests.support.servers import free_port, ready, wait_for
from tests.support.user_models import COLORS, lightgbm_with_category

pytestmark = pytest.mark.process

ROWS = [
    {"size": 0.4, "weight": -1.2, "color": "red"},
    {"size": -0.7, "weight": 0.3, "color": "blue"},
    {"size": 1.5, "weight": 0.0, "color": "green"},
]


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


def test_make_serve_serves_what_make_package_wrote_with_no_digest_pinned_by_hand(
    tmp_path: Path,
) -> None:
    user = lightgbm_with_category()
    joblib.dump(user.model, tmp_path / "model.joblib")
    user.reference.dropna().to_csv(tmp_path / "reference.csv", index=False)
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"TRUSTED_MODEL_SHA256", "BACKEND", "MODEL_VERSION", "BIND"}
    }
    env |= {
        "MODEL_DIR": str(tmp_path / "models"),
        "TRUSTED_DIGESTS_FILE": str(tmp_path / "etc" / "trusted-model-sha256"),
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    packaging = make(
        "package",
        f"MODEL_FILE={tmp_path / 'model.joblib'}",
        "NAME=colors",
        "VERSION=1.0.0",
        f"REFERENCE_DATA={tmp_path / 'reference.csv'}",
        "TARGET=label",
        "PACKAGE_ARGS=--parity-random-rows 100",
        env=env,
        log=tmp_path / "package.log",
    )
    assert packaging.wait(timeout=300) == 0, (tmp_path / "package.log").read_text()
    output = (tmp_path / "package.log").read_text()
    bundle = tmp_path / "models" / "colors" / "1.0.0"
    digest = model_sha256(bundle)
    assert f"trusted: model.joblib sha256 {digest} recorded in " in output
    assert (tmp_path / "etc" / "trusted-model-sha256").read_text().startswith(digest)

    server = make("serve", "MODEL_NAME=colors", env=env, log=tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(lambda: ready(url), 120, what="make serve")
        except TimeoutError:
            pytest.fail((tmp_path / "serve.log").read_text())
        with httpx.Client(timeout=10) as client:
            info = client.get(f"{url}/model-info").json()
            assert info["backend"] == "sklearn"
            answers = client.post(f"{url}/predict/batch", json={"instances": ROWS}).json()
            unknown = client.post(f"{url}/predict", json={**ROWS[0], "color": "mauve"})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    frame = pd.DataFrame(ROWS).astype({"color": pd.CategoricalDtype(list(COLORS))})
    expected = user.model.predict_proba(frame)
    served = np.array([list(a["probabilities"].values()) for a in answers["predictions"]])
    # Probabilities travel rounded to 7 decimals.
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "color"]
