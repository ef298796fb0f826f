"""The background writer: a bounded buffer the request path appends to, and a
thread that turns what it holds into lines and writes them.

The request path never waits on the disk nor on a lock: it appends a
reference to a deque (atomic under the GIL) or, when the buffer is full,
counts a drop. The thread wakes every FLUSH_SECONDS, takes everything
buffered, encodes it and writes it with one write(2): a SIGKILLed worker
loses at most what was buffered since the last wake.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.capture.events import Captured, event_lines
from service.logs import APP_LOGGER

if TYPE_CHECKING:
    from service.capture.files import RotatingFiles

log = logging.getLogger(APP_LOGGER)

FLUSH_SECONDS = 0.1
# Requests buffered at most; a request past it is dropped and counted.
BUFFER_REQUESTS = 10_000


class PayloadWriter:
    def __init__(
        self,
        files: RotatingFiles,
        on_drop: Callable[[int], None] | None = None,
        buffer_requests: int = BUFFER_REQUESTS,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self.files = files
        self._on_drop = on_drop
        self._limit = buffer_requests
        self._flush_seconds = flush_seconds
        self._buffer: deque[Captured] = deque()
        self._stop = threading.Event()
        # Requests the thread failed to write (a full or read-only disk),
        # reported as drops from the event loop's thread: the metrics' values
        # are written by that thread only (service.metrics.client_internals).
        self._lost = 0
        self._lost_reported = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, captured: Captured) -> None:
        """Called on the request path: never blocks."""
        dropped = 0
        if len(self._buffer) < self._limit:
            self._buffer.append(captured)
        else:
            dropped = 1
        if self._lost != self._lost_reported:
            lost = self._lost
            dropped += lost - self._lost_reported
            self._lost_reported = lost
        if dropped:
            self.dropped += dropped
            if self._on_drop is not None:
                self._on_drop(dropped)

    def close(self) -> None:
        """Write what is buffered and stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.files.close()

    def _run(self) -> None:
        while not self._stop.wait(self._flush_seconds):
            self._write_buffered()
        self._write_buffered()

    def _write_buffered(self) -> None:
        buffer = self._buffer
        taken = [buffer.popleft() for _ in range(len(buffer))]
        lines: list[bytes] = []
        encoded = 0
        for captured in taken:
            try:
                lines += event_lines(captured)
            except Exception as exc:
                # Inputs the events cannot describe: that request alone is lost.
                self._lose(1, exc)
            else:
                encoded += 1
        if not lines:
            return
        try:
            self.files.write(lines)
        except OSError as exc:
            self._lose(encoded, exc)

    def _lose(self, requests: int, exc: Exception) -> None:
        if self._lost == 0:
            log.error(
                f"payload log: requests not written: {type(exc).__name__}: {exc}",
                extra={"fields": {"directory": str(self.files.directory)}},
            )
        self._lost += requests
