"""The access log: one JSON line per request, written whole."""

from __future__ import annotations

import json
import os

from service.logs import AccessLog


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_each_request_is_one_json_line_with_the_usual_fields() -> None:
    read_end, write_end = os.pipe()
    log = AccessLog("INFO", fd=write_end)
    log.write({"method": "POST", "path": "/predict", "status": 200, "request_id": "r1"})
    log.write({"method": "GET", "path": "/health", "status": 200, "request_id": "r2"})
    lines = _read_all(read_end).splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["logger"] == "ml_api.access"
    assert first["msg"] == "request"
    assert first["worker_pid"] == os.getpid()
    assert first["ts"].endswith("Z")
    assert (first["method"], first["status"], first["request_id"]) == ("POST", 200, "r1")


def test_nothing_is_written_above_info() -> None:
    read_end, write_end = os.pipe()
    AccessLog("WARNING", fd=write_end).write({"path": "/predict"})
    assert _read_all(read_end) == b""
