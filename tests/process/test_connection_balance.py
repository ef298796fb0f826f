"""Keep-alive connections opened in a burst are split between the workers."""

from __future__ import annotations

import collections
import json
import socket
from pathlib import Path

import pytest

from tests.support.bundles import SETOSA
from tests.support.servers import Gunicorn, running_gunicorn, wait_for

pytestmark = pytest.mark.process

CONNECTIONS = 32
ROUNDS = 3
# Workers an even split would give 16 each; the bench's balance target is at most 20.
MOST_PER_WORKER = 20


def _request(request_id: str) -> bytes:
    body = json.dumps(SETOSA).encode()
    return (
        b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _read_response(sock: socket.socket) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, rest = received.partition(b"\r\n\r\n")
    length = int(
        next(
            line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        ).split(b":")[1]
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head


def _burst_split(server: Gunicorn, round_number: int) -> collections.Counter[int]:
    """Open every connection first (as wrk and nginx's pool do), then one request on each."""
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(CONNECTIONS)]
    try:
        ids = [f"burst-{round_number}-{i}" for i in range(CONNECTIONS)]
        for sock, request_id in zip(sockets, ids, strict=True):
            sock.sendall(_request(request_id))
        for sock in sockets:
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
        wanted = set(ids)

        def logged() -> dict[str, int]:
            return {
                line["request_id"]: line["worker_pid"]
                for line in server.access_log()
                if line["request_id"] in wanted
            }

        wait_for(lambda: len(logged()) == CONNECTIONS, 5, what="access log lines")
        return collections.Counter(logged().values())
    finally:
        for sock in sockets:
            sock.close()


def test_a_burst_of_keepalive_connections_is_split_between_workers(
    model_dir: Path, tmp_path: Path
) -> None:
    with running_gunicorn(model_dir, tmp_path / "logs", workers=2) as server:
        workers = server.worker_pids()
        for round_number in range(ROUNDS):
            split = _burst_split(server, round_number)
            assert set(split) == workers, split
            assert max(split.values()) <= MOST_PER_WORKER, split
