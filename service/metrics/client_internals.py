"""Every use of prometheus_client's internals, in this one module.

The public API has no cheap write path and no way to merge multiprocess
files, so the metrics package reaches past it here and only here:

- the multiprocess value class (`prometheus_client.values.ValueClass`, its
  `_multiprocess` flag, a value's `_value`, `_file`, `_key` and its mmap
  dict's `_positions` and `_m`): a leaner increment;
- a labelled child's `_value` and a histogram child's `_upper_bounds`,
  `_buckets` and `_sum`: writes that skip per-call checks, and bulk histogram
  updates;
- `prometheus_client.mmap_dict.MmapedDict` and the multiprocess file names
  (`<type>_<pid>.db`; the collector reads the type from the name up to the
  first underscore): folding a dead worker's files into aggregate ones.

prometheus_client is pinned in the lock file, and
tests/unit/test_prometheus_client_internals.py pins each of these: an upgrade
that changes one fails there by name, not as wrong totals in process tests.

Nothing here imports prometheus_client at import time: the package imports
this module before PROMETHEUS_MULTIPROC_DIR may be set (see service.metrics),
and the library picks its value storage when first imported.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

_pack_double = struct.Struct("d").pack


def install_lean_values() -> None:
    """A cheaper increment for prometheus_client's multiprocess values.

    Every `inc()` of the library's mmap-backed value takes a process-wide lock
    and re-checks the pid, to survive threads and a fork after the value was
    created. In an ml-api worker neither happens on the hot path: the metrics
    are created after Gunicorn forks the worker, and every increment runs on
    the worker's event-loop thread (backend threads never touch metrics).
    Dropping both halves the cost of a write; counters are the writes left on
    the request path (service.metrics.buffered holds the rest). `set()` and
    reads keep the library's locking.
    """
    from prometheus_client import values

    base: Any = values.ValueClass
    if not getattr(base, "_multiprocess", False) or getattr(base, "_lean", False):
        return

    class LeanMmapedValue(base):  # type: ignore[misc]
        _lean = True

        def inc(self, amount: float) -> None:
            # MmapedDict.write_value without its two extra calls: the entry
            # exists (created with the value), its timestamp stays 0.0, and
            # the mapping is looked up each time because the file may have
            # been remapped to grow. One slice assignment, as the library
            # does, never a transient 0 as pack_into would write.
            self._value += amount
            file = self._file
            position = file._positions[self._key]
            file._m[position : position + 8] = _pack_double(self._value)

    values.ValueClass = LeanMmapedValue


def incrementer(child: Counter) -> Callable[[float], None]:
    """The labelled child's value's own inc(). Counter.inc() re-checks on every
    call what holds from the child's creation on: its labels are complete, and
    the service only ever adds positive counts."""
    increment: Callable[[float], None] = child._value.inc
    return increment


def upper_bounds(child: Histogram) -> list[float]:
    """The histogram's bucket bounds, +Inf last."""
    return list(child._upper_bounds)


def add_to_histogram(child: Histogram, bucket_counts: Sequence[int], total: float) -> None:
    """Add per-bucket (non-cumulative) counts and their sum, as that many
    observe() calls would."""
    for bucket, count in zip(child._buckets, bucket_counts, strict=True):
        if count:
            bucket.inc(count)
    child._sum.inc(total)


def process_file(directory: Path, metric_type: str, pid: int) -> Path:
    """The file a process's values of one (counter or histogram) type live in."""
    return directory / f"{metric_type}_{pid}.db"


def add_file_into_aggregate(directory: Path, metric_type: str, source: Path) -> None:
    """Add every value in `source` to the type's aggregate file, which the
    multiprocess collector reads as one more process's file of that type."""
    from prometheus_client.mmap_dict import MmapedDict

    aggregate = MmapedDict(str(directory / f"{metric_type}_aggregate.db"))
    try:
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(source)):
            current, _ = aggregate.read_value(key)
            aggregate.write_value(key, current + value, timestamp)
    finally:
        aggregate.close()
