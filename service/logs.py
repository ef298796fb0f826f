"""JSON logging: one line per request on stdout, errors and lifecycle on stderr."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

ACCESS_LOGGER = "ml_api.access"
APP_LOGGER = "ml_api"


def _timestamp(seconds: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        + f".{int(seconds % 1 * 1000):03d}Z"
    )


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


class AccessLog:
    """One JSON line per request on stdout, in the same shape as the other logs.

    Built with orjson and written with one os.write per line: the logging
    module's record, formatter and handler lock cost ~20 µs a request, about a
    tenth of a prediction. A single write of a line under PIPE_BUF is atomic,
    so lines from several workers sharing stdout never interleave.
    """

    def __init__(self, level: str, fd: int | None = None) -> None:
        self.enabled = logging.getLevelName(level) <= logging.INFO
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._pid = os.getpid()

    def write(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.time()
        line = orjson.dumps(
            {
                "ts": _timestamp(now),
                "level": "info",
                "logger": ACCESS_LOGGER,
                "msg": "request",
                "worker_pid": self._pid,
                **fields,
            }
        )
        view = memoryview(line + b"\n")
        while view:
            view = view[os.write(self._fd, view) :]


INTERNAL_ERROR = "internal server error"


def log_unexpected(exc: BaseException, request_id: str | None, path: str) -> None:
    """An exception no handler expected: always a bug, logged with its request id."""
    logging.getLogger(APP_LOGGER).error(
        "unhandled exception",
        exc_info=exc,
        extra={"fields": {"request_id": request_id, "path": path}},
    )
