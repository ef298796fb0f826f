"""Statistics buffered in the worker reach the shared values on every flush,
including the one a shutting-down worker makes."""

from __future__ import annotations

import asyncio

import numpy as np
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


def test_feature_rows_and_batches_land_in_their_columns_histograms_as_observe_would() -> None:
    buckets = (1.0, 2.0, 5.0)
    columns = [0, 2]  # column 1 has no histogram (a category, or no deciles)
    bulk = [Histogram(f"buffered_rows_{i}", "r", buckets=buckets, registry=None) for i in columns]
    direct = [Histogram(f"direct_rows_{i}", "r", buckets=buckets, registry=None) for i in columns]
    group = buffered.BufferedHistograms(bulk, columns)
    rows = [[0.5, 7.0, 2.0], [1.0, 7.0, 9.0], [3.0, 7.0, 5.0]]
    for row in rows:
        group.add_row(row)
    batch = np.array([[6.0, 7.0, 0.0], [2.0, 7.0, 2.0000001]])
    group.add_rows(batch)
    for row in [*rows, *batch.tolist()]:
        for histogram, column in zip(direct, columns, strict=True):
            histogram.observe(row[column])
    assert all(b.get() == 0 for h in bulk for b in h._buckets)
    buffered.flush_all()
    for flushed, observed in zip(bulk, direct, strict=True):
        assert [b.get() for b in flushed._buckets] == [b.get() for b in observed._buckets]
        assert flushed._sum.get() == observed._sum.get()


def test_a_buffer_past_its_bound_is_flushed_without_waiting_for_the_task() -> None:
    child = Histogram("buffered_bound", "b", buckets=(1.0,), registry=None)
    group = buffered.BufferedHistograms([child], [0])
    for _ in range(buffered.MAX_PENDING + 1):
        group.add_row([0.5])
    assert child._buckets[0].get() == buffered.MAX_PENDING + 1
