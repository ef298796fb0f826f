"""The sklearn backend batches concurrent requests without changing any answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.app import create_app
from service.settings import ServiceSettings
from tests.support.bundles import SETOSA, model_sha256

Bodies = list[bytes]


def _rows(count: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(3)
    lows = np.array([4.3, 2.0, 1.0, 0.1])
    highs = np.array([7.9, 4.4, 6.9, 2.5])
    values = rng.uniform(lows, highs, size=(count, 4)).round(2)
    return [dict(zip(SETOSA, map(float, row), strict=True)) for row in values]


async def _burst(settings: ServiceSettings, bodies: Bodies) -> tuple[list[httpx.Response], Any]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            responses = await asyncio.gather(
                *(
                    client.post("/predict", content=b, headers={"content-type": "application/json"})
                    for b in bodies
                )
            )
            metrics = (await client.get("/metrics")).text
    return list(responses), metrics


def _run(model_dir: Path, bodies: Bodies, **settings: Any) -> tuple[list[httpx.Response], Any]:
    trusted = model_sha256(model_dir / "iris" / "1.0.0")
    return asyncio.run(
        _burst(
            ServiceSettings(model_dir=model_dir, trusted_model_sha256=trusted, **settings), bodies
        )
    )


def _encode(rows: list[dict[str, float]]) -> Bodies:
    return [json.dumps(row).encode() for row in rows]


def test_batched_answers_equal_unbatched_ones_row_for_row(model_dir: Path) -> None:
    bodies = _encode(_rows(120))
    batched, metrics = _run(model_dir, bodies, backend="sklearn", batch_wait_ms=5)
    unbatched, _ = _run(model_dir, bodies, backend="sklearn", micro_batching=False)
    assert [r.status_code for r in batched] == [200] * 120
    assert [r.json() for r in batched] == [r.json() for r in unbatched]
    # Batching really happened: fewer backend calls than requests.
    calls = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("model_batch_rows_count{")
    )
    assert calls < 120


def test_a_malformed_row_in_a_concurrent_burst_affects_no_other(model_dir: Path) -> None:
    rows = _rows(40)
    bodies = _encode(rows)
    bodies[17] = b'{"sepal_length": "oops", "sepal_width": 3, "petal_length": 1, "petal_width": 1}'
    responses, _ = _run(model_dir, bodies, backend="sklearn", batch_wait_ms=5)
    reference, _ = _run(model_dir, _encode(rows), backend="sklearn", micro_batching=False)
    assert responses[17].status_code == 422
    assert responses[17].json()["detail"][0]["loc"] == ["body", "sepal_length"]
    for index, (got, want) in enumerate(zip(responses, reference, strict=True)):
        if index != 17:
            assert got.status_code == 200
            assert got.json() == want.json()


def test_queue_overflow_answers_503_with_retry_after(model_dir: Path) -> None:
    bodies = _encode(_rows(60))
    responses, _ = _run(
        model_dir, bodies, backend="sklearn", batch_queue_size=2, max_batch_size=1, batch_wait_ms=0
    )
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1"
    assert "busy" in busy.json()["detail"]


def test_onnx_backend_does_not_batch_by_default(make_client: Callable[..., Any]) -> None:
    with make_client() as client:
        assert client.get("/model-info").json()["inference"]["micro_batching"] is False
    with make_client(backend="sklearn") as client:
        assert client.get("/model-info").json()["inference"]["micro_batching"] is True
