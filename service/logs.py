"""JSON logging: one line per request on stdout, errors and lifecycle on stderr."""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import re
import sys
import time
import weakref
from typing import Any

import orjson

ACCESS_LOGGER = "ml_api.access"
APP_LOGGER = "ml_api"


# Control characters (a newline forges a log line, an escape sequence
# rewrites the terminal) and the Unicode line separators.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(value: object) -> str:
    """`value` as text safe inside one plain-text log line: control characters
    as Python escapes. The JSON logs need none of this (orjson escapes)."""
    return _UNPRINTABLE.sub(lambda match: repr(match.group())[1:-1], str(value))


class _Timestamps:
    """ISO 8601 UTC with milliseconds, as time.strftime would give it.

    strftime and gmtime cost about 1.5 µs and their result only changes once a
    second: the formatted second is kept and only the milliseconds are
    looked up per call. The cache is one tuple, replaced in one assignment, so
    threads logging at once at worst format the same second twice.
    """

    def __init__(self) -> None:
        self._second: tuple[float, str] = (math.nan, "")

    def __call__(self, seconds: float) -> str:
        # gmtime floors a float to its second: so does // 1 (nan never equals).
        floor = seconds // 1
        second = self._second
        if second[0] != floor:
            second = (floor, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
            self._second = second
        # seconds % 1 < 1 - 2**-53, so the product rounds to below 1000.
        return second[1] + _MILLISECONDS[int(seconds % 1 * 1000)]


_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))
_timestamp = _Timestamps()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "worker_pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _handler(stream: Any) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    return handler


def configure_logging(level: str) -> None:
    """Idempotent: each worker calls it at startup, tests call it many times."""
    app_logger = logging.getLogger(APP_LOGGER)
    app_logger.handlers = [_handler(sys.stderr)]
    app_logger.setLevel(level)
    app_logger.propagate = False


# Linux's PIPE_BUF: a write of at most this many bytes to a pipe is never
# interleaved with another process's write to the same pipe.
ATOMIC_WRITE_BYTES = 4096


class AccessLog:
    """One JSON line per request on stdout, in the same shape as the other logs.

    Built with orjson and written with os.write: the logging module's record,
    formatter and handler lock cost ~20 µs a request, about a tenth of a
    prediction. Lines written while an event loop runs are collected and
    written together once per loop iteration (one call_soon), so a loaded
    worker makes one write for many requests instead of one each.

    Lines from several workers sharing stdout never interleave: each write
    carries whole lines and at most ATOMIC_WRITE_BYTES (a pipe writes that
    much atomically), except a longer line, which is written alone as before.
    Nothing is lost: asyncio.Runner (asyncio.run, uvicorn's worker, on
    asyncio's loop or uvloop's) runs the ready callbacks while shutting down,
    before closing its loop; lines a loop left behind anyway go out before the
    next line, on flush_access_logs() (a lifespan's end) or at interpreter exit.

    Used from one event-loop thread at a time (a worker's loop); without a
    running loop each line is written at once.
    """

    def __init__(self, level: str, fd: int | None = None) -> None:
        self.enabled = logging.getLevelName(level) <= logging.INFO
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._pid = os.getpid()
        self._pending = bytearray()
        # The loop a flush is scheduled on, None when none is.
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        _LIVE.add(self)

    def write(self, fields: dict[str, Any]) -> None:
        """One line: the fields every line has, then `fields` (which may replace them)."""
        if not self.enabled:
            return
        line = {
            "ts": _timestamp(time.time()),
            "level": "info",
            "logger": ACCESS_LOGGER,
            "msg": "request",
            "worker_pid": self._pid,
            **fields,
        }
        self._add(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))

    def write_request(
        self,
        method: str,
        path: str,
        status: int,
        duration_ms: float,
        request_id: str,
        client: str | None,
        key_id: str | None,
    ) -> None:
        """write() of a request's usual fields, the line built from one dict
        (no dict of fields to make and merge: ~0.3 µs of the line's ~1.3)."""
        if not self.enabled:
            return
        self._add(
            orjson.dumps(
                {
                    "ts": _timestamp(time.time()),
                    "level": "info",
                    "logger": ACCESS_LOGGER,
                    "msg": "request",
                    "worker_pid": self._pid,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": duration_ms,
                    "request_id": request_id,
                    "client": client,
                    "key_id": key_id,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        )

    def _add(self, line: bytes) -> None:
        scheduled = self._flush_loop
        # A flush scheduled on a loop that runs: that is the caller's loop
        # (one event-loop thread at a time), and asking for the running loop
        # costs a getpid() system call in CPython 3.11, once a request.
        if scheduled is None or not scheduled.is_running():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                self._write_all(line)
                return
            if scheduled is not loop:
                if scheduled is not None:
                    # Lines of another loop, closed before its flush ran, go first.
                    self.flush()
                loop.call_soon(self.flush)
                self._flush_loop = loop
        if len(self._pending) + len(line) > ATOMIC_WRITE_BYTES:
            self._write_pending()
            if len(line) > ATOMIC_WRITE_BYTES:
                self._write_all(line)
                return
        self._pending += line

    def flush(self) -> None:
        """Write every pending line now (the loop's callback, a lifespan's end, exit)."""
        self._flush_loop = None
        self._write_pending()

    def _write_pending(self) -> None:
        lines = self._pending
        if lines:
            # Taken before writing: a write that raises must not leave the
            # lines to be written again by the next flush.
            self._pending = bytearray()
            self._write_all(lines)

    def _write_all(self, data: bytes | bytearray) -> None:
        written = os.write(self._fd, data)
        if written < len(data):
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(self._fd, view) :]

    def _forget_pending(self) -> None:
        # In a forked child: the parent writes its own pending lines.
        self._pending = bytearray()
        self._flush_loop = None


_LIVE: weakref.WeakSet[AccessLog] = weakref.WeakSet()


def flush_access_logs() -> None:
    """Write the lines every access log still holds (a lifespan's end, exit)."""
    for access_log in list(_LIVE):
        try:
            access_log.flush()
        except OSError:
            # stdout gone (a closed pipe): the other logs may still have a place to go.
            continue


def _forget_all_pending() -> None:
    for access_log in list(_LIVE):
        access_log._forget_pending()


atexit.register(flush_access_logs)
os.register_at_fork(after_in_child=_forget_all_pending)


INTERNAL_ERROR = "internal server error"


def log_unexpected(exc: BaseException, request_id: str | None, path: str) -> None:
    """An exception no handler expected: always a bug, logged with its request id."""
    logging.getLogger(APP_LOGGER).error(
        "unhandled exception",
        exc_info=exc,
        extra={"fields": {"request_id": request_id, "path": path}},
    )
