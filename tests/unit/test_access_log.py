"""The access log: one JSON line per request, written whole, in as few writes as
the lines of one event-loop iteration allow, and never lost."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from service import logs
from service.logs import ATOMIC_WRITE_BYTES, AccessLog
from service.middleware import RequestContextMiddleware

ROOT = Path(__file__).resolve().parents[2]
REQUEST = {"method": "POST", "path": "/predict", "status": 200, "request_id": "r1"}


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    received = b""
    try:
        while chunk := os.read(fd, 1 << 20):
            received += chunk
    except BlockingIOError:
        pass
    return received


def _timestamp_before(seconds: float) -> str:
    """The timestamp as it was formatted before the per-second cache."""
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        + f".{int(seconds % 1 * 1000):03d}Z"
    )


def _line_before(fields: dict[str, Any], now: float, pid: int) -> bytes:
    """The access-log line as it was written before batching."""
    return (
        orjson.dumps(
            {
                "ts": _timestamp_before(now),
                "level": "info",
                "logger": "ml_api.access",
                "msg": "request",
                "worker_pid": pid,
                **fields,
            }
        )
        + b"\n"
    )


class _RecordedWrites:
    """os.write, recording what each call wrote."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self._write = os.write

    def __call__(self, fd: int, data: Any) -> int:
        self.calls.append(bytes(data))
        return self._write(fd, data)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> _RecordedWrites:
    recorded = _RecordedWrites()
    monkeypatch.setattr(os, "write", recorded)
    return recorded


Runner = Callable[[Coroutine[Any, Any, None]], None]


def _asyncio_run(main: Coroutine[Any, Any, None]) -> None:
    asyncio.run(main)


def _uvloop_run(main: Coroutine[Any, Any, None]) -> None:
    # What uvicorn's Gunicorn worker does: asyncio's Runner on a uvloop loop.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


RUNNERS = pytest.mark.parametrize("run", [_asyncio_run, _uvloop_run], ids=["asyncio", "uvloop"])


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


def test_timestamps_are_formatted_as_strftime_formats_them() -> None:
    rng = random.Random(13)
    seconds = [1_764_517_527.0 + offset for offset in range(-3, 4)]
    fractions = [0.0, 1e-6, 0.0005, 0.001, 0.0999, 0.5, 0.9, 0.999, 0.9995, 0.9999, 0.999999]
    values = [second + fraction for second in seconds for fraction in fractions]
    values += [rng.uniform(0, 4_102_444_800) for _ in range(5000)]
    values += [1_764_517_527 + rng.random() * 5 for _ in range(5000)]
    # Forwards, backwards and shuffled: the cached second must follow every change.
    for ordered in (sorted(values), sorted(values, reverse=True), rng.sample(values, len(values))):
        timestamp = logs._Timestamps()
        assert [timestamp(value) for value in ordered] == [
            _timestamp_before(value) for value in ordered
        ]


def test_lines_carry_the_same_content_and_key_order_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = 1_764_517_527.9995
    monkeypatch.setattr(time, "time", lambda: now)
    read_end, write_end = os.pipe()
    log = AccessLog("INFO", fd=write_end)
    requests: list[dict[str, Any]] = [
        {
            "method": "POST",
            "path": "/predict",
            "status": 200,
            "duration_ms": 0.123,
            "request_id": "0123456789abcdef",
            "client": "127.0.0.1",
            "key_id": None,
        },
        {"method": "GET", "path": '/caf\u00e9/\u2603\n"', "status": 499, "client": None},
        {"level": "overridden", "ts": "kept in place", "extra": [1, {"a": 2.5}]},
        {},
    ]
    for fields in requests:
        log.write(fields)
    expected = b"".join(_line_before(fields, now, os.getpid()) for fields in requests)
    assert _read_all(read_end) == expected


def test_a_request_line_is_the_line_of_its_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    # The middleware's write_request builds its line without a dict of fields:
    # byte for byte the line write() makes of them.
    monkeypatch.setattr(time, "time", lambda: 1_764_517_527.25)
    read_end, write_end = os.pipe()
    log = AccessLog("INFO", fd=write_end)
    path = '/caf\u00e9/\u2603\n"'
    for client, key_id in (("127.0.0.1", "bench"), (None, None)):
        log.write_request("POST", path, 499, 0.063, "0123456789abcdef", client, key_id)
        fields = {
            "method": "POST",
            "path": path,
            "status": 499,
            "duration_ms": 0.063,
            "request_id": "0123456789abcdef",
            "client": client,
            "key_id": key_id,
        }
        log.write(fields)
        first, second = _read_all(read_end).splitlines()
        assert first == second
        assert list(json.loads(first))[5:] == list(fields)


def test_lines_of_one_loop_iteration_go_out_in_few_writes_of_whole_lines(
    writes: _RecordedWrites,
) -> None:
    read_end, write_end = os.pipe()
    log = AccessLog("INFO", fd=write_end)
    sent = [{**REQUEST, "request_id": f"{i:04d}", "pad": "x" * (i % 300)} for i in range(200)]

    async def main() -> None:
        for fields in sent:
            log.write(fields)
        # Nothing but full chunks goes out before the loop gets control back.
        assert all(len(call) > ATOMIC_WRITE_BYTES - 600 for call in writes.calls)
        await asyncio.sleep(0)

    asyncio.run(main())
    received = _read_all(read_end)
    lines = received.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [f["request_id"] for f in sent]
    assert b"".join(writes.calls) == received
    assert all(len(call) <= ATOMIC_WRITE_BYTES and call.endswith(b"\n") for call in writes.calls)
    # Whole lines only, and no chunk left short while the next line would have fit.
    for call, following in zip(writes.calls, writes.calls[1:], strict=False):
        assert len(call) + len(following.split(b"\n", 1)[0]) + 1 > ATOMIC_WRITE_BYTES
    assert len(writes.calls) <= len(received) // (ATOMIC_WRITE_BYTES - 600) + 1


def test_a_line_longer_than_an_atomic_write_is_written_alone(writes: _RecordedWrites) -> None:
    read_end, write_end = os.pipe()
    log = AccessLog("INFO", fd=write_end)
    long_id = "x" * (2 * ATOMIC_WRITE_BYTES)

    async def main() -> None:
        log.write({**REQUEST, "request_id": "before"})
        log.write({**REQUEST, "request_id": long_id})
        log.write({**REQUEST, "request_id": "after"})
        await asyncio.sleep(0)

    with os.fdopen(read_end, "rb") as reader:
        asyncio.run(main())
        os.close(write_end)
        received = reader.read()
    assert [json.loads(call)["request_id"] for call in writes.calls] == ["before", long_id, "after"]
    assert b"".join(writes.calls) == received


@pytest.mark.parametrize("in_loop", [False, True], ids=["no loop", "in a loop"])
def test_a_short_write_is_continued_until_every_line_is_out(
    monkeypatch: pytest.MonkeyPatch, in_loop: bool
) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:100])))
    read_end, write_end = os.pipe()
    log = AccessLog("INFO", fd=write_end)
    sent = [{**REQUEST, "request_id": f"{i}"} for i in range(5)]

    async def main() -> None:
        for fields in sent:
            log.write(fields)

    if in_loop:
        asyncio.run(main())
    else:
        for fields in sent:
            log.write(fields)
    lines = _read_all(read_end).splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["0", "1", "2", "3", "4"]


@RUNNERS
def test_a_request_logged_as_the_loop_ends_is_written(run: Runner, tmp_path: Path) -> None:
    out = tmp_path / "stdout"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = RequestContextMiddleware(app, AccessLog("INFO", fd=fd))
    scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    async def one_request() -> None:
        await middleware(scope, receive, send)
        # Batched: still pending when the application's last coroutine returns.
        assert out.read_bytes() == b""

    try:
        run(one_request())
    finally:
        os.close(fd)
    [line] = out.read_bytes().splitlines()
    assert json.loads(line)["status"] == 204


def _log_on_a_loop_stopped_before_its_flush(log: AccessLog, request_id: str) -> None:
    """The write's flush is scheduled, but the loop stops and closes first."""
    loop = asyncio.new_event_loop()

    def log_and_stop() -> None:
        log.write({**REQUEST, "request_id": request_id})
        loop.stop()

    loop.call_soon(log_and_stop)
    loop.run_forever()
    loop.close()


def test_lines_left_by_a_loop_stopped_before_its_flush_go_out_first() -> None:
    read_end, write_end = os.pipe()
    log = AccessLog("INFO", fd=write_end)
    _log_on_a_loop_stopped_before_its_flush(log, "old loop")
    assert _read_all(read_end) == b""

    async def next_loop() -> None:
        log.write({**REQUEST, "request_id": "new loop"})

    asyncio.run(next_loop())
    ids = [json.loads(line)["request_id"] for line in _read_all(read_end).splitlines()]
    assert ids == ["old loop", "new loop"]


def test_flushing_the_access_logs_writes_what_a_stopped_loop_left() -> None:
    read_end, write_end = os.pipe()
    log = AccessLog("INFO", fd=write_end)
    _log_on_a_loop_stopped_before_its_flush(log, "left behind")
    assert _read_all(read_end) == b""
    logs.flush_access_logs()
    assert json.loads(_read_all(read_end))["request_id"] == "left behind"


_STOPPED_LOOP_THEN_EXIT = """
import asyncio, sys
from service.logs import AccessLog
log = AccessLog("INFO")
loop = asyncio.new_event_loop()
def log_and_stop():
    log.write({"request_id": "pending at exit"})
    loop.stop()
loop.call_soon(log_and_stop)
loop.run_forever()
"""


def test_lines_still_pending_at_interpreter_exit_are_written() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _STOPPED_LOOP_THEN_EXIT],
        capture_output=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    assert [json.loads(line)["request_id"] for line in done.stdout.splitlines()] == [
        "pending at exit"
    ]


_WRITER = """
import asyncio, sys
from service.logs import AccessLog
log = AccessLog("INFO")
async def main():
    for i in range(3000):
        # Lines of 100 to 3000 bytes, so chunk boundaries fall everywhere.
        log.write({"request_id": f"{i}", "pad": "y" * (i * 7919 % 2900)})
        if i % 7 == 6:
            await asyncio.sleep(0)
asyncio.run(main())
"""


def test_two_processes_sharing_a_pipe_never_interleave_lines() -> None:
    read_end, write_end = os.pipe()
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER], stdout=write_end, cwd=ROOT)
        for _ in range(2)
    ]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        received = reader.read()
    for writer in writers:
        assert writer.wait(timeout=60) == 0
    per_pid: dict[int, list[str]] = {}
    for line in received.splitlines():
        entry = json.loads(line)
        per_pid.setdefault(entry["worker_pid"], []).append(entry["request_id"])
    assert sorted(per_pid) == sorted(writer.pid for writer in writers)
    assert all(ids == [str(i) for i in range(3000)] for ids in per_pid.values())
