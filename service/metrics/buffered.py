"""Statistics accumulated in the worker and written to the shared files in the background.

Histograms (latencies, batch sizes, per-feature inputs) and the in-progress
gauge are statistics, not accounting. Written through on every request they
were 15 of the 18 mmap writes of a single-row prediction; here they are
counted in plain Python and flushed every FLUSH_SECONDS by a task on the
worker's event loop, once more when the worker shuts down, and by the worker
that answers a scrape. A SIGKILLed worker loses at most FLUSH_SECONDS of them.
Request, prediction and per-key counters are not buffered: they stay exact
and synchronous.

Everything here runs on the event-loop thread (see
client_internals.install_lean_values), so the buffers need no lock.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import Gauge, Histogram

from service.metrics.client_internals import add_to_histogram, upper_bounds

FLUSH_SECONDS = 0.5


class Flushable(Protocol):
    def flush(self) -> None: ...


_BUFFERS: weakref.WeakSet[Flushable] = weakref.WeakSet()


def bucket_counts(upper_bounds: list[float], values: npt.NDArray[np.floating]) -> list[int]:
    """Per-bucket (non-cumulative) counts, as Histogram.observe() would add them one by one."""
    indices = np.searchsorted(np.asarray(upper_bounds), values, side="left")
    counts: list[int] = np.bincount(indices, minlength=len(upper_bounds)).tolist()
    return counts


# A buffer of rows or arrays this long is flushed at once rather than wait for
# the task: large batches at a high rate stay bounded in memory. Single values
# (one float a request) wait for the task, every FLUSH_SECONDS.
MAX_PENDING = 65_536


class BufferedHistogram:
    """One labelled Histogram child, observed locally and flushed in bulk.

    A request only appends its value (add_one is the list's own append); the
    values are bucketed with numpy when flushed, where a thousand cost about
    what a handful of bisect() calls would on the request path.
    """

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds = upper_bounds(child)
        self._values: list[float] = []
        self._arrays: list[npt.NDArray[np.floating]] = []
        self.add_one = self._values.append
        _BUFFERS.add(self)

    def add_many(self, values: npt.NDArray[np.floating]) -> None:
        self._arrays.append(values)
        if len(self._arrays) > MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        values, arrays = self._values, self._arrays
        if not values and not arrays:
            return
        total = sum(values)
        for array in arrays:
            total += float(array.sum())
        # One concatenation, however many batches arrived since the last flush.
        pending = np.concatenate(
            [np.asarray(values, dtype=np.float64)]
            + [array.astype(np.float64, copy=False) for array in arrays]
        )
        # The same list object stays behind add_one.
        values.clear()
        self._arrays = []
        add_to_histogram(self._child, bucket_counts(self._bounds, pending), total)


class BufferedHistograms:
    """Histograms observed together, one value each: chosen columns of a row."""

    def __init__(self, children: list[Histogram], columns: list[int]) -> None:
        self.histograms = [BufferedHistogram(child) for child in children]
        self._columns = columns
        self._rows: list[Sequence[float]] = []
        self._matrices: list[npt.NDArray[np.floating]] = []
        _BUFFERS.add(self)

    def add_row(self, row: Sequence[float]) -> None:
        # The whole row: its columns are picked out when flushed.
        self._rows.append(row)
        if len(self._rows) > MAX_PENDING:
            self.flush()

    def add_rows(self, rows: npt.NDArray[np.floating]) -> None:
        self._matrices.append(rows)
        if len(self._matrices) > MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        rows, matrices = self._rows, self._matrices
        if rows and self._columns:
            self._add_columns(np.asarray(rows, dtype=np.float64))
        for matrix in matrices:
            self._add_columns(matrix)
        self._rows, self._matrices = [], []
        for histogram in self.histograms:
            histogram.flush()

    def _add_columns(self, matrix: npt.NDArray[np.floating]) -> None:
        for column, histogram in zip(self._columns, self.histograms, strict=True):
            values = matrix[:, column]
            # A missing value (NaN) is no observation of the feature's distribution.
            histogram.add_many(values[~np.isnan(values)])


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
