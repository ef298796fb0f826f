"""Statistics accumulated in the worker and written to the shared files in the background.

Histograms (latencies, batch sizes, per-feature inputs) and the in-progress
gauge are statistics, not accounting. Written through on every request they
were 15 of the 18 mmap writes of a single-row prediction; here they are
counted in plain Python and flushed every FLUSH_SECONDS by a task on the
worker's event loop, once more when the worker shuts down, and by the worker
that answers a scrape. A SIGKILLed worker loses at most FLUSH_SECONDS of them.
Request, prediction and per-key counters are not buffered: they stay exact
and synchronous.

Everything here runs on the event-loop thread (see lean_values), so the
buffers need no lock.
"""

from __future__ import annotations

import asyncio
import bisect
import weakref
from typing import Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import Gauge, Histogram

FLUSH_SECONDS = 0.5


class Flushable(Protocol):
    def flush(self) -> None: ...


_BUFFERS: weakref.WeakSet[Flushable] = weakref.WeakSet()


def bucket_counts(upper_bounds: list[float], values: npt.NDArray[np.floating]) -> list[int]:
    """Per-bucket (non-cumulative) counts, as Histogram.observe() would add them one by one."""
    indices = np.searchsorted(np.asarray(upper_bounds), values, side="left")
    counts: list[int] = np.bincount(indices, minlength=len(upper_bounds)).tolist()
    return counts


class BufferedHistogram:
    """One labelled Histogram child, observed locally and flushed in bulk."""

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending = False
        _BUFFERS.add(self)

    def add_one(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value
        self._pending = True

    def add_many(self, values: npt.NDArray[np.floating]) -> None:
        counts = self._counts
        for index, count in enumerate(bucket_counts(self._bounds, values)):
            counts[index] += count
        self._sum += float(values.sum())
        self._pending = True

    def flush(self) -> None:
        if not self._pending:
            return
        counts, total = self._counts, self._sum
        self._counts, self._sum, self._pending = [0] * len(counts), 0.0, False
        for bucket, count in zip(self._child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self._child._sum.inc(total)


class BufferedHistograms:
    """Histograms observed together, one value each: a row's features."""

    def __init__(self, children: list[Histogram]) -> None:
        self.histograms = [BufferedHistogram(child) for child in children]

    def add_row(self, values: list[float]) -> None:
        # add_one inlined: this runs for every single-row prediction.
        for histogram, value in zip(self.histograms, values, strict=True):
            histogram._counts[bisect.bisect_left(histogram._bounds, value)] += 1
            histogram._sum += value
            histogram._pending = True

    def add_columns(self, rows: npt.NDArray[np.floating]) -> None:
        for column, histogram in enumerate(self.histograms):
            histogram.add_many(rows[:, column])


class BufferedGauge:
    """A gauge child moved by inc()/dec() in the worker; flush() publishes its value."""

    def __init__(self, child: Gauge) -> None:
        self._child = child
        self.value = 0
        self._published = 0
        _BUFFERS.add(self)

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1

    def flush(self) -> None:
        if self.value != self._published:
            self._published = self.value
            self._child.set(self.value)


def flush_all() -> None:
    for buffer in list(_BUFFERS):
        buffer.flush()


async def flush_periodically(seconds: float = FLUSH_SECONDS) -> None:
    """Runs for the worker's lifetime; the final flush happens when it is cancelled."""
    try:
        while True:
            await asyncio.sleep(seconds)
            flush_all()
    finally:
        flush_all()
