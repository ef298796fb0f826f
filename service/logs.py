"""JSON logging: one line per request on stdout, errors and lifecycle on stderr."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

ACCESS_LOGGER = "ml_api.access"
APP_LOGGER = "ml_api"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers = [_handler(sys.stdout)]
    access.setLevel(level)
    access.propagate = False


def log_request(fields: dict[str, Any]) -> None:
    access = logging.getLogger(ACCESS_LOGGER)
    if access.isEnabledFor(logging.INFO):
        access.info("request", extra={"fields": fields})


INTERNAL_ERROR = "internal server error"


def log_unexpected(exc: BaseException, request_id: str | None, path: str) -> None:
    """An exception no handler expected: always a bug, logged with its request id."""
    logging.getLogger(APP_LOGGER).error(
        "unhandled exception",
        exc_info=exc,
        extra={"fields": {"request_id": request_id, "path": path}},
    )
