"""Drift scores end to end: real Gunicorn workers count the inputs, a real Prometheus
scrapes them and evaluates the rules `make rules` generates from the bundle's manifest.

Each scenario runs on a fresh server and a fresh Prometheus, so its window holds
only its own traffic: rows drawn from the Iris data (what the reference statistics
describe) leave every PSI low and no alert pending; the same rows with one feature
shifted drive that feature's PSI (and only that one) up and its alert to pending;
rows of one class only drive the prediction's PSI up. A model with nullable
features (tests/support/missing_values.py) served rows like its reference data
keeps each missing rate near the reference one and MlApiMissingRateJump inactive;
the same rows with 40% of one feature left out drive that feature's missing rate
up and its alert to pending.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import yaml

from tests.support.bundles import pinned_digests
from tests.support.missing_values import (
    NUMBERS,
    STRINGS,
    TITANIC_NAME,
    instance,
    package_titanic,
)
from tests.support.prometheus import Prometheus, running_prometheus, write_drift_rules
from tests.support.servers import free_port, running_gunicorn, wait_for
from training.datasets import load_builtin

pytestmark = pytest.mark.process

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
ROWS = 3000
BATCH = 100
MIN_ROWS = 500
LOW, HIGH = 0.1, 0.25
# Grafana-free proof of what an operator sees: the PSI series by feature.
FEATURE_PSI = 'ml_api:feature_psi:1h{model="iris"}'
PREDICTION_PSI = 'ml_api:prediction_psi:1h{model="iris"}'


def _iris_rows(seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """ROWS rows drawn with replacement from the Iris data, and their classes."""
    data = load_builtin("iris")
    picks = np.random.default_rng(seed).integers(0, len(data.X), ROWS)
    return np.asarray(data.X, dtype=np.float64)[picks], np.asarray(data.y)[picks]


def _config(directory: Path, api_port: int, rules: Path) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            # A job name of the user's choosing: the rules must not depend on it.
            {"job_name": "anything", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]}
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def _scenario(
    model_dir: Path, directory: Path, name: str = "iris", env: dict[str, str] | None = None
) -> Iterator[tuple[str, Prometheus]]:
    """A fresh two-worker Gunicorn and a fresh Prometheus that has scraped it once
    before any traffic, so every counter's increase starts from zero."""
    directory.mkdir()
    rules = directory / "drift.yml"
    write_drift_rules(model_dir, rules, "--for", "2s", "--min-rows", str(MIN_ROWS), name=name)
    with running_gunicorn(model_dir, directory / "gunicorn", workers=2, env=env) as api:
        port = free_port()
        config = _config(directory, api.port, rules)
        with running_prometheus(config, directory / "tsdb", port) as prometheus:
            wait_for(
                lambda: prometheus.query("model_feature_value_count"),
                30,
                interval=0.2,
                what="a scrape before any traffic",
            )
            yield api.url, prometheus


def _send(url: str, rows: npt.NDArray[np.float64]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for start in range(0, len(rows), BATCH):
            instances = [
                dict(zip(FEATURES, row, strict=True))
                for row in rows[start : start + BATCH].tolist()
            ]
            response = client.post("/predict/batch", json={"instances": instances})
            assert response.status_code == 200, response.text


def _scores(prometheus: Prometheus, rows: int) -> tuple[dict[str, float], float]:
    """Each feature's PSI and the prediction's, once the rules have seen every row."""

    def counted() -> bool:
        seen = prometheus.query('ml_api:prediction_rows:1h{model="iris"}')
        # increase() extrapolates to the window's edge: a little above the count.
        return bool(seen) and float(seen[0]["value"][1]) >= rows * 0.999

    wait_for(counted, 30, interval=0.2, what=f"the rules to count {rows} rows")
    wait_for(
        lambda: len(prometheus.query(FEATURE_PSI)) == len(FEATURES),
        15,
        interval=0.2,
        what="a PSI per feature",
    )
    features = {s["metric"]["feature"]: float(s["value"][1]) for s in prometheus.query(FEATURE_PSI)}
    (prediction,) = prometheus.query(PREDICTION_PSI)
    return features, float(prediction["value"][1])


def _alerts(prometheus: Prometheus) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = prometheus.get("/api/v1/alerts")["alerts"]
    return alerts


def test_traffic_like_the_reference_scores_low_and_alerts_nothing(
    model_dir: Path, tmp_path: Path
) -> None:
    rows, _ = _iris_rows(seed=1)
    with _scenario(model_dir, tmp_path / "reference") as (url, prometheus):
        _send(url, rows)
        features, prediction = _scores(prometheus, len(rows))
        assert set(features) == set(FEATURES)
        assert all(score < LOW for score in features.values()), features
        assert prediction < LOW
        # Every group evaluated again with all the rows in its window: nothing pending.
        _wait_for_another_evaluation(prometheus)
        assert _alerts(prometheus) == []


def _evaluations(prometheus: Prometheus) -> dict[str, str]:
    groups = prometheus.get("/api/v1/rules")["groups"]
    return {group["name"]: group["lastEvaluation"] for group in groups}


def _wait_for_another_evaluation(prometheus: Prometheus) -> None:
    seen = _evaluations(prometheus)
    wait_for(
        lambda: all(now != seen[name] for name, now in _evaluations(prometheus).items()),
        15,
        interval=0.2,
        what="the rules to be evaluated again",
    )


def test_one_shifted_feature_scores_high_and_its_alert_goes_pending(
    model_dir: Path, tmp_path: Path
) -> None:
    rows, _ = _iris_rows(seed=2)
    shifted = FEATURES.index("sepal_width")
    rows[:, shifted] += 0.6
    with _scenario(model_dir, tmp_path / "shifted") as (url, prometheus):
        _send(url, rows)
        features, _ = _scores(prometheus, len(rows))
        assert features["sepal_width"] > HIGH, features
        untouched = {name: score for name, score in features.items() if name != "sepal_width"}
        assert all(score < LOW for score in untouched.values()), features

        def drift_alert() -> list[dict[str, Any]]:
            return [
                a for a in _alerts(prometheus) if a["labels"]["alertname"] == "MlApiFeatureDrift"
            ]

        wait_for(lambda: drift_alert(), 15, interval=0.2, what="MlApiFeatureDrift")
        (alert,) = drift_alert()
        assert alert["state"] in {"pending", "firing"}
        assert alert["labels"]["feature"] == "sepal_width"
        assert alert["labels"]["model"] == "iris"
        assert alert["labels"]["version"] == "1.0.0"
        assert "sepal_width" in alert["annotations"]["summary"]
        assert f"{float(alert['value']):.2f}" in alert["annotations"]["summary"]


def test_a_skewed_class_mix_scores_high_on_the_prediction(model_dir: Path, tmp_path: Path) -> None:
    rows, classes = _iris_rows(seed=3)
    virginica = rows[classes == 2]
    with _scenario(model_dir, tmp_path / "skewed") as (url, prometheus):
        _send(url, virginica)
        _, prediction = _scores(prometheus, len(virginica))
        assert prediction > HIGH
        wait_for(
            lambda: any(
                a["labels"]["alertname"] == "MlApiPredictionDrift" for a in _alerts(prometheus)
            ),
            15,
            interval=0.2,
            what="MlApiPredictionDrift",
        )


# --- missing values: a model with nullable features ------------------------------

JUMPED = "embarked"  # missing from ~3% of the reference rows
MISSING_RATE = 'ml_api:feature_missing_rate:1h{model="titanic"}'
REFERENCE_MISSING_RATE = 'ml_api:feature_reference_missing_rate{model="titanic"}'


@pytest.fixture(scope="module")
def titanic(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    _, frame, model_dir = package_titanic(tmp_path_factory.mktemp("titanic"))
    return frame, model_dir


def _titanic_rows(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """ROWS // 2 rows drawn with replacement from the reference rows."""
    picks = np.random.default_rng(seed).integers(0, len(frame), ROWS // 2)
    return frame.iloc[picks].reset_index(drop=True)


def _send_frame(url: str, rows: pd.DataFrame) -> None:
    instances = [instance(row) for _, row in rows.iterrows()]
    with httpx.Client(base_url=url, timeout=30) as client:
        for start in range(0, len(instances), BATCH):
            batch = {"instances": instances[start : start + BATCH]}
            response = client.post("/predict/batch", json=batch)
            assert response.status_code == 200, response.text


def _missing_rates(prometheus: Prometheus, rows: int) -> dict[str, tuple[float, float]]:
    """Each feature's live missing rate and its reference rate, once the rules
    have seen every row."""
    one = f'{{model="titanic", feature="{JUMPED}"}}'
    seen = f"ml_api:feature_missing_rows:1h{one} + ml_api:feature_rows:1h{one}"

    def counted() -> bool:
        found = prometheus.query(seen)
        return bool(found) and float(found[0]["value"][1]) >= rows * 0.999

    wait_for(counted, 30, interval=0.2, what=f"the rules to count {rows} rows")
    live = {s["metric"]["feature"]: float(s["value"][1]) for s in prometheus.query(MISSING_RATE)}
    reference = {
        s["metric"]["feature"]: float(s["value"][1])
        for s in prometheus.query(REFERENCE_MISSING_RATE)
    }
    assert set(live) == set(reference) == set(NUMBERS + STRINGS), (live, reference)
    return {name: (live[name], reference[name]) for name in live}


def _missing_alerts(prometheus: Prometheus) -> list[dict[str, Any]]:
    return [a for a in _alerts(prometheus) if a["labels"]["alertname"] == "MlApiMissingRateJump"]


def _titanic_scenario(
    model_dir: Path, directory: Path
) -> AbstractContextManager[tuple[str, Prometheus]]:
    env = {"MODEL_NAME": TITANIC_NAME, "TRUSTED_MODEL_SHA256": pinned_digests(model_dir)}
    return _scenario(model_dir, directory, TITANIC_NAME, env)


def test_missing_values_like_the_reference_leave_the_missing_rate_alert_inactive(
    titanic: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    frame, model_dir = titanic
    rows = _titanic_rows(frame, seed=4)
    with _titanic_scenario(model_dir, tmp_path / "reference") as (url, prometheus):
        _send_frame(url, rows)
        rates = _missing_rates(prometheus, len(rows))
        assert all(abs(live - reference) < 0.05 for live, reference in rates.values()), rates
        assert rates["age"][1] > 0.1  # the reference rows do miss ages
        _wait_for_another_evaluation(prometheus)
        assert _missing_alerts(prometheus) == []


def test_a_jump_in_missing_values_raises_that_features_rate_and_its_alert_goes_pending(
    titanic: tuple[pd.DataFrame, Path], tmp_path: Path
) -> None:
    frame, model_dir = titanic
    rows = _titanic_rows(frame, seed=5)
    left_out = np.random.default_rng(6).random(len(rows)) < 0.4
    rows.loc[left_out, JUMPED] = np.nan
    with _titanic_scenario(model_dir, tmp_path / "jump") as (url, prometheus):
        _send_frame(url, rows)
        rates = _missing_rates(prometheus, len(rows))
        live, reference = rates[JUMPED]
        assert live == pytest.approx(rows[JUMPED].isna().mean(), abs=0.01)
        assert live > reference + 0.3, rates
        others = {name: rate for name, rate in rates.items() if name != JUMPED}
        assert all(abs(now - then) < 0.05 for now, then in others.values()), rates

        wait_for(lambda: _missing_alerts(prometheus), 15, interval=0.2, what="MlApiMissingRateJump")
        (alert,) = _missing_alerts(prometheus)
        assert alert["state"] in {"pending", "firing"}
        assert alert["labels"]["feature"] == JUMPED
        assert alert["labels"]["model"] == TITANIC_NAME
        assert alert["labels"]["version"] == "1.0.0"
        assert JUMPED in alert["annotations"]["summary"]
        assert f"{float(alert['value']):.2f}" in alert["annotations"]["summary"]
