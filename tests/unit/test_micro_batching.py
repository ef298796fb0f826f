"""The micro-batcher: right answers to the right callers, bounded, failure-isolated."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from service.batching import BatchQueueFullError, InferenceError, MicroBatcher

POISON = -1.0
T = TypeVar("T")


def _model(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A deterministic stand-in: row-dependent probabilities; poison rows fail the call."""
    if (rows[:, 0] == POISON).any():
        raise ValueError("poisoned batch")
    first = 1 / (1 + np.exp(-rows[:, 0].astype(np.float64)))
    return np.stack([first, 1 - first], axis=1)


def _row(value: float) -> npt.NDArray[np.float64]:
    return np.array([[value, 0.0]], dtype=np.float64)


async def _with_batcher(batcher: MicroBatcher, work: Coroutine[Any, Any, T]) -> T:
    batcher.start()
    try:
        return await work
    finally:
        await batcher.stop()


def test_concurrent_rows_get_their_own_answers_in_batches() -> None:
    batches: list[int] = []
    batcher = MicroBatcher(
        _model,
        max_rows=16,
        wait_seconds=0.005,
        queue_size=1000,
        on_batch=lambda rows, _: batches.append(rows),
    )
    values = np.random.default_rng(7).normal(size=300).astype(np.float64)

    async def burst() -> list[npt.NDArray[np.floating]]:
        return await asyncio.gather(*(batcher.predict(_row(v)) for v in values))

    answers = asyncio.run(_with_batcher(batcher, burst()))
    expected = _model(np.stack([_row(v)[0] for v in values]))
    assert np.array_equal(np.concatenate(answers), expected)
    assert sum(batches) == 300
    assert max(batches) == 16
    assert len(batches) < 300 / 4


def test_a_failing_batch_fails_only_its_own_callers() -> None:
    batcher = MicroBatcher(_model, max_rows=4, wait_seconds=0.01, queue_size=100)

    async def burst() -> list[npt.NDArray[np.floating] | BaseException]:
        first = [batcher.predict(_row(v)) for v in (0.1, 0.2, POISON, 0.3)]
        await asyncio.sleep(0.05)  # the poisoned batch runs alone
        second = [batcher.predict(_row(v)) for v in (0.4, 0.5)]
        return await asyncio.gather(*first, *second, return_exceptions=True)

    results = asyncio.run(_with_batcher(batcher, burst()))
    assert all(isinstance(r, InferenceError) for r in results[:4])
    assert "poisoned batch" in str(results[0])
    for result, value in zip(results[4:], (0.4, 0.5), strict=True):
        assert isinstance(result, np.ndarray)
        assert np.array_equal(result, _model(_row(value)))


def test_a_full_queue_refuses_instead_of_growing() -> None:
    release = threading.Event()

    def slow_model(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        release.wait(5)
        return _model(rows)

    batcher = MicroBatcher(slow_model, max_rows=1, wait_seconds=0, queue_size=2)

    async def overflow() -> None:
        busy = asyncio.ensure_future(batcher.predict(_row(0.0)))
        await asyncio.sleep(0.05)  # the collector is now blocked in slow_model
        queued = [asyncio.ensure_future(batcher.predict(_row(v))) for v in (1.0, 2.0)]
        await asyncio.sleep(0)
        with pytest.raises(BatchQueueFullError):
            await batcher.predict(_row(3.0))
        release.set()
        results = await asyncio.gather(busy, *queued)
        assert [float(r[0, 0]) for r in results] == [
            float(_model(_row(v))[0, 0]) for v in (0.0, 1.0, 2.0)
        ]

    asyncio.run(_with_batcher(batcher, overflow()))


def test_callers_that_went_away_are_skipped() -> None:
    seen: list[int] = []
    batcher = MicroBatcher(
        _model,
        max_rows=8,
        wait_seconds=0.02,
        queue_size=100,
        on_batch=lambda rows, _: seen.append(rows),
    )

    async def cancel_one() -> npt.NDArray[np.floating]:
        gone = asyncio.ensure_future(batcher.predict(_row(5.0)))
        kept = asyncio.ensure_future(batcher.predict(_row(6.0)))
        await asyncio.sleep(0)
        gone.cancel()
        return await kept

    answer = asyncio.run(_with_batcher(batcher, cancel_one()))
    assert np.array_equal(answer, _model(_row(6.0)))
    assert seen == [1]


def test_a_dead_batching_task_fails_its_waiting_callers_at_once_and_restarts() -> None:
    batcher = MicroBatcher(_model, max_rows=8, wait_seconds=0.01, queue_size=100)

    async def kill_then_serve() -> tuple[list[Any], npt.NDArray[np.floating]]:
        # Rows of different widths cannot be stacked: the task itself dies
        # (outside the backend call), with these callers waiting on it.
        doomed = [
            batcher.predict(_row(0.1)),
            batcher.predict(np.zeros((1, 3), dtype=np.float32)),
        ]
        # The bound is only there so a regression fails instead of hanging.
        failed = await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True), 30)
        return failed, await asyncio.wait_for(batcher.predict(_row(0.7)), 30)

    failed, later = asyncio.run(_with_batcher(batcher, kill_then_serve()))
    assert all(isinstance(result, InferenceError) for result in failed)
    assert "batching failed" in str(failed[0])
    assert np.array_equal(later, _model(_row(0.7)))
    assert batcher.restarts == 1


def test_a_failing_batch_callback_does_not_cost_the_callers_their_answers() -> None:
    def broken_metrics(rows: int, seconds: float) -> None:
        raise RuntimeError("metrics broke")

    batcher = MicroBatcher(
        _model, max_rows=8, wait_seconds=0.01, queue_size=100, on_batch=broken_metrics
    )

    async def two_rounds() -> list[npt.NDArray[np.floating]]:
        first = await asyncio.wait_for(batcher.predict(_row(0.2)), 30)
        second = await asyncio.wait_for(batcher.predict(_row(0.3)), 30)
        return [first, second]

    answers = asyncio.run(_with_batcher(batcher, two_rounds()))
    assert np.array_equal(answers[0], _model(_row(0.2)))
    assert np.array_equal(answers[1], _model(_row(0.3)))
    # The first batch's callback killed the task, which restarted to serve the
    # second; whether the second death is seen before stop() is a race.
    assert batcher.restarts >= 1
