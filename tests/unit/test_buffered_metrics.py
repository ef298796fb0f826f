"""Statistics buffered in the worker reach the shared values on every flush,
including the one a shutting-down worker makes."""

from __future__ import annotations

import asyncio

from prometheus_client import Gauge, Histogram

from service.metrics import buffered


def test_nothing_is_written_until_a_flush_and_nothing_twice() -> None:
    child = Histogram("buffered_a", "a", buckets=(1.0, 2.0), registry=None)
    histogram = buffered.BufferedHistogram(child)
    for value in (0.5, 1.5, 1.5, 9.0):
        histogram.add_one(value)
    assert child._sum.get() == 0
    buffered.flush_all()
    assert [b.get() for b in child._buckets] == [1, 2, 1]
    assert child._sum.get() == 12.5
    buffered.flush_all()
    assert [b.get() for b in child._buckets] == [1, 2, 1]


def test_gauge_publishes_its_current_value() -> None:
    child = Gauge("buffered_b", "b", registry=None)
    gauge = buffered.BufferedGauge(child)
    gauge.inc()
    gauge.inc()
    gauge.dec()
    buffered.flush_all()
    assert child._value.get() == 1


def test_the_periodic_task_flushes_once_more_when_cancelled() -> None:
    child = Histogram("buffered_c", "c", buckets=(1.0,), registry=None)
    histogram = buffered.BufferedHistogram(child)

    async def run() -> None:
        task = asyncio.create_task(buffered.flush_periodically(seconds=3600))
        await asyncio.sleep(0)
        histogram.add_one(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert child._buckets[0].get() == 1
