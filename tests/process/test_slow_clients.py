"""Clients connected straight to the workers cannot hold them: slow or
unfinished heads and bodies are closed at their deadlines, huge heads are
refused without being buffered, idle connections past the cap make room, and
normal requests are answered throughout."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from service.server.acceptor import ACCEPT_BATCH
from tests.support.raw_http import PREDICT, closed_by_server, exchange
from tests.support.scrape import scrape, series
from tests.support.servers import Gunicorn, running_gunicorn

pytestmark = pytest.mark.process

HEAD_TIMEOUT = 2
BODY_TIMEOUT = 2
CAP_PER_WORKER = 100
# Generous: only a connection the server never closes gets near it.
CLIENT_TIMEOUT_SECONDS = 60
MIB = 1024 * 1024
LIMITS = {
    "REQUEST_HEAD_TIMEOUT": str(HEAD_TIMEOUT),
    "REQUEST_BODY_TIMEOUT": str(BODY_TIMEOUT),
    "MAX_CONNECTIONS_PER_WORKER": str(CAP_PER_WORKER),
}


async def _open(port: int, first: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
    return reader, writer


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await closed_by_server(reader)
    except ConnectionError:
        # Reset, or our own write failed: the server closed with bytes unread.
        return b""


async def _trickle(port: int, head: bytes) -> bytes:
    """A head sent a byte every 0.2 s, until the server closes the connection."""
    reader, writer = await _open(port)
    closed = asyncio.create_task(_until_closed(reader))
    try:
        for byte in head:
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.2)
        return await closed
    finally:
        writer.close()


async def _predictions_answered(port: int, count: int) -> list[int]:
    return [(await exchange(port, PREDICT)).status for _ in range(count)]


async def _slow_clients(port: int) -> dict[str, list[bytes]]:
    async with asyncio.timeout(CLIENT_TIMEOUT_SECONDS):
        partial_lines = [await _open(port, b"POST /predi") for _ in range(10)]
        short_bodies = [
            await _open(port, PREDICT.replace(b"Content-Length: ", b"Content-Length: 9")[:-5])
            for _ in range(10)
        ]
        silent = [await _open(port) for _ in range(10)]
        trickled = [
            asyncio.create_task(_trickle(port, b"GET /health/live HTTP/1.1\r\nHost: " + b"t" * 200))
            for _ in range(10)
        ]
        outcome = {
            "partial line": [await _until_closed(reader) for reader, _ in partial_lines],
            "short body": [await _until_closed(reader) for reader, _ in short_bodies],
            "silent": [await _until_closed(reader) for reader, _ in silent],
            "trickled": list(await asyncio.gather(*trickled)),
        }
        for _, writer in partial_lines + short_bodies + silent:
            writer.close()
        return outcome


def _closed_by_reason(server: Gunicorn) -> dict[str, float]:
    with httpx.Client(timeout=30) as client:
        found = series(scrape(client, server.url), "ml_api_connections_closed_total")
    return {dict(labels)["reason"]: value for labels, value in found.items()}


def test_unfinished_heads_and_bodies_are_closed_at_their_deadlines(
    model_dir: Path, tmp_path: Path
) -> None:
    with running_gunicorn(model_dir, tmp_path / "logs", env=LIMITS) as server:
        outcome = asyncio.run(_slow_clients(server.port))
        closed = _closed_by_reason(server)
    for answer in outcome["partial line"] + outcome["trickled"]:
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert answer.endswith(f"request head not received within {HEAD_TIMEOUT}.0 s".encode())
    for answer in outcome["short body"]:
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert answer.endswith(f"request body not received within {BODY_TIMEOUT}.0 s".encode())
    assert outcome["silent"] == [b""] * 10
    assert closed["head_timeout"] >= 30
    assert closed["body_timeout"] >= 10


async def _idle_flood(port: int, connections: int, most_held: int) -> tuple[list[int], int]:
    """`connections` idle connections (more than both workers' caps), then,
    once the workers have dealt with them, predictions on new connections
    while the rest are held."""
    async with asyncio.timeout(CLIENT_TIMEOUT_SECONDS):
        idle = [await _open(port) for _ in range(connections)]

        def still_open() -> int:
            return sum(1 for reader, _ in idle if not reader.at_eof())

        # Connected is not accepted: while the flood's tail still waits in the
        # listen queue, a prediction queued among it is turned away with it
        # (over the cap with nothing idle to close yet), as a flood's are.
        for _ in range(CLIENT_TIMEOUT_SECONDS * 20):
            if still_open() <= most_held:
                break
            await asyncio.sleep(0.05)
        answered = await _predictions_answered(port, 20)
        held = still_open()
        for _, writer in idle:
            writer.close()
        return answered, held


def test_idle_connections_past_the_cap_make_room_for_clients_that_send(
    model_dir: Path, tmp_path: Path
) -> None:
    # Long deadlines: only the cap closes anything here.
    env = {**LIMITS, "REQUEST_HEAD_TIMEOUT": "600"}
    # A worker holds at most its cap plus one batch of connections still handshaking.
    most_held = 2 * (CAP_PER_WORKER + ACCEPT_BATCH)
    flood = 3 * most_held // 2
    with running_gunicorn(model_dir, tmp_path / "logs", env=env) as server:
        answered, still_open = asyncio.run(_idle_flood(server.port, flood, most_held))
        closed = _closed_by_reason(server)
    assert answered == [200] * 20
    assert still_open <= most_held
    assert closed.get("idle_evicted", 0) + closed.get("over_limit", 0) >= flood - most_held


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert found is not None
    return int(found.group(1)) / 1024


async def _huge_head(port: int, size: int) -> bytes:
    """A request whose one header would be `size` bytes, sent in 64 KiB writes
    until the server answers and closes."""
    reader, writer = await _open(port, b"GET /health/live HTTP/1.1\r\nHost: test\r\nX-Huge: ")
    chunk = b"h" * 65536
    try:
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass  # closed by the server mid-send: what it answered is in the reader
    finally:
        answer = await _until_closed(reader)
        writer.close()
    return answer


async def _huge_heads(port: int) -> tuple[list[bytes], list[int]]:
    async with asyncio.timeout(CLIENT_TIMEOUT_SECONDS * 2):
        heads = [asyncio.create_task(_huge_head(port, 32 * MIB)) for _ in range(8)]
        answered = await _predictions_answered(port, 10)
        return list(await asyncio.gather(*heads)), answered


def test_huge_heads_are_refused_without_growing_the_workers(
    model_dir: Path, tmp_path: Path
) -> None:
    with running_gunicorn(model_dir, tmp_path / "logs") as server:
        asyncio.run(_predictions_answered(server.port, 50))
        workers = server.worker_pids()
        idle = {pid: _rss_mib(pid) for pid in workers}
        answers, answered = asyncio.run(_huge_heads(server.port))
        grown = {pid: _rss_mib(pid) - idle[pid] for pid in workers}
        closed = _closed_by_reason(server)
    assert answered == [200] * 10
    # The 431 reaches a client still sending only if it reads before the reset.
    for answer in answers:
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert closed["head_too_large"] == 8
    assert max(grown.values()) < 20, grown
