"""A cheaper increment for prometheus_client's multiprocess values.

Every `inc()` of prometheus_client's mmap-backed value takes a process-wide
lock and re-checks the pid, to survive threads and a fork after the value was
created. In an ml-api worker neither happens on the hot path: the metrics are
created after Gunicorn forks the worker, and every increment runs on the
worker's event-loop thread (backend threads never touch metrics). Dropping
both halves the cost of a write, and a prediction makes about eighteen.
`set()` and reads keep the library's locking.

prometheus_client is pinned in the lock file; the multi-worker tests compare
scraped totals with the requests sent, so a change in its internals shows.
"""

from __future__ import annotations

from typing import Any


def install() -> None:
    from prometheus_client import values

    base: Any = values.ValueClass
    if not getattr(base, "_multiprocess", False) or getattr(base, "_lean", False):
        return

    class LeanMmapedValue(base):  # type: ignore[misc]
        _lean = True

        def inc(self, amount: float) -> None:
            self._value += amount
            self._file.write_value(self._key, self._value, 0.0)

    values.ValueClass = LeanMmapedValue
