"""A packaged user model (integer, number and text features; a regressor) under real
Gunicorn workers: answers and metrics are exact across workers, on both backends."""

from __future__ import annotations

from pathlib import Path

import httpx
import pandas as pd
import pytest

from service.metrics.buffered import FLUSH_SECONDS
from tests.support.bundles import pinned_digests
from tests.support.scrape import sample, scrape, series
from tests.support.servers import running_gunicorn, wait_for
from tests.support.user_models import MIXED_NAME, mixed_regressor, package_mixed_regressor

pytestmark = pytest.mark.process

WORKERS = 2
ROWS = [
    {"rooms": 3, "area": 80.5, "city": "lyon"},
    {"rooms": 5, "area": 150.0, "city": "paris"},
    {"rooms": 1, "area": 25.0, "city": "nice"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_mixed_regressor(tmp_path_factory.mktemp("flats"))


@pytest.mark.parametrize("backend", ["onnx", "sklearn"])
def test_workers_answer_like_the_estimator_and_count_every_input(
    model_dir: Path, tmp_path: Path, backend: str
) -> None:
    model, _ = mixed_regressor()
    expected = model.predict(pd.DataFrame(ROWS))
    env = {
        "MODEL_NAME": MIXED_NAME,
        "BACKEND": backend,
        "TRUSTED_MODEL_SHA256": pinned_digests(model_dir),
    }
    with (
        running_gunicorn(model_dir, tmp_path, workers=WORKERS, env=env) as server,
        httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client,
    ):
        rounds = 4
        for _ in range(rounds):
            for row, value in zip(ROWS, expected, strict=True):
                answer = client.post(f"{server.url}/predict", json=row).json()
                assert answer["prediction"] == pytest.approx(value, rel=1e-5)
        bad = client.post(f"{server.url}/predict", json={**ROWS[0], "city": "rome"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "city"]

        samples = scrape(client, server.url)
        labels = {"model": MIXED_NAME, "version": "1.0.0"}
        for city in ("lyon", "paris", "nice"):
            counted = sample(
                samples, "model_feature_category_total", **labels, feature="city", value=city
            )
            assert counted == rounds

        # Histograms are buffered in each worker and flushed within FLUSH_SECONDS.
        def all_predictions_flushed() -> bool:
            latest = scrape(client, server.url)
            return sample(latest, "model_prediction_value_count", **labels) >= rounds * len(ROWS)

        wait_for(all_predictions_flushed, 10 * FLUSH_SECONDS, interval=0.1, what="histogram flush")
        predicted = sample(scrape(client, server.url), "model_prediction_value_count", **labels)
        assert predicted == rounds * len(ROWS)
        assert not series(samples, "model_predictions_total")  # no classes for a regressor
