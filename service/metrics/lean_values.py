"""A cheaper increment for prometheus_client's multiprocess values.

Every `inc()` of prometheus_client's mmap-backed value takes a process-wide
lock and re-checks the pid, to survive threads and a fork after the value was
created. In an ml-api worker neither happens on the hot path: the metrics are
created after Gunicorn forks the worker, and every increment runs on the
worker's event-loop thread (backend threads never touch metrics). Dropping
both halves the cost of a write; counters are the writes left on the request
path (service.metrics.buffered holds the rest).
`set()` and reads keep the library's locking.

prometheus_client is pinned in the lock file; the multi-worker tests compare
scraped totals with the requests sent, so a change in its internals shows.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Not at run time: the package imports this module before prometheus_client
    # may be imported (see service.metrics).
    from prometheus_client import Counter

_pack_double = struct.Struct("d").pack


def install() -> None:
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
