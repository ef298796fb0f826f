"""What a client connected straight to a worker can hold: the head's size,
the time its head and body take, and idle connections at the cap."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from service.server.worker import (
    ConnectionLimits,
    WholeResponseProtocol,
    close_after_answer,
    close_longest_idle,
    connection_cap,
    expire_overdue,
)

LIMITS = ConnectionLimits(head_bytes=1024, head_timeout=10, body_timeout=30)
LATER = 3600.0  # seconds past every deadline


async def echo(scope: Any, receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Limited(WholeResponseProtocol):
    limits = LIMITS


async def early(scope: Any, receive: Any, send: Any) -> None:
    """Answers without reading the body, as a refusal (413, 401) does."""
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"no"})


@asynccontextmanager
async def serving(
    app: Any = echo,
) -> AsyncIterator[Callable[[], Awaitable[tuple[socket.socket, Limited]]]]:
    config = Config(app=app, lifespan="off", log_config=None)
    state = ServerState()
    loop = asyncio.get_running_loop()
    opened: list[socket.socket] = []

    async def connect() -> tuple[socket.socket, Limited]:
        server_end, client_end = socket.socketpair()
        client_end.setblocking(False)
        opened.append(client_end)
        _, protocol = await loop.connect_accepted_socket(
            lambda: Limited(config=config, server_state=state, app_state={}), server_end
        )
        assert isinstance(protocol, Limited)
        return client_end, protocol

    try:
        yield connect
    finally:
        for client_end in opened:
            client_end.close()


async def _until_closed(client_end: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(30):
        while chunk := await loop.sock_recv(client_end, 1 << 20):
            received += chunk
    return received


async def _answer(client_end: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(30):
        while b"\r\n\r\n" not in received:
            received += await loop.sock_recv(client_end, 65536)
    return received


def _later(protocol: Limited) -> float:
    return protocol.loop.time() + LATER


def test_a_head_over_the_limit_is_answered_431_and_closed() -> None:
    async def run() -> bytes:
        async with serving() as connect:
            client_end, _ = await connect()
            client_end.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 4096)
            return await _until_closed(client_end)

    received = asyncio.run(run())
    assert received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close\r\n" in received
    assert received.endswith(b"request head larger than 1024 bytes")


def test_a_small_head_with_a_large_body_in_the_same_read_is_served() -> None:
    async def run() -> bytes:
        async with serving() as connect:
            client_end, _ = await connect()
            body = b"b" * 8192
            head = b"POST / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            client_end.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return await _until_closed(client_end)

    received = asyncio.run(run())
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"b" * 8192)


def test_a_connection_that_sends_nothing_is_closed_silently_at_its_head_deadline() -> None:
    async def run() -> bytes:
        async with serving() as connect:
            client_end, protocol = await connect()
            expire_overdue([protocol], protocol.loop.time())  # not yet due: stays
            assert not protocol.transport.is_closing()
            expire_overdue([protocol], _later(protocol))
            return await _until_closed(client_end)

    assert asyncio.run(run()) == b""


def test_a_trickled_head_gets_408_at_its_deadline_however_recent_its_last_byte() -> None:
    async def run() -> bytes:
        async with serving() as connect:
            client_end, protocol = await connect()
            loop = asyncio.get_running_loop()
            for byte in b"GET / HTTP/1.1\r\nHost: te":
                await loop.sock_sendall(client_end, bytes([byte]))
            await asyncio.sleep(0.05)
            expire_overdue([protocol], _later(protocol))
            return await _until_closed(client_end)

    received = asyncio.run(run())
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert received.endswith(b"request head not received within 10 s")


def test_a_body_short_of_its_length_gets_408_and_the_application_sees_the_client_leave() -> None:
    async def run() -> bytes:
        async with serving() as connect:
            client_end, protocol = await connect()
            head = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n"
            client_end.sendall(head + b"only part")
            await asyncio.sleep(0.05)
            assert protocol.head_deadline is None
            expire_overdue([protocol], _later(protocol))
            return await _until_closed(client_end)

    received = asyncio.run(run())
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert received.endswith(b"request body not received within 30 s")


def test_after_an_answer_the_next_head_has_its_own_deadline() -> None:
    async def run() -> tuple[bytes, bytes]:
        async with serving() as connect:
            client_end, protocol = await connect()
            client_end.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            first = await _answer(client_end)
            assert protocol.head_deadline is not None
            assert protocol.head_deadline > protocol.loop.time()
            expire_overdue([protocol], _later(protocol))
            return first, await _until_closed(client_end)

    first, rest = asyncio.run(run())
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest == b""


def test_at_the_cap_the_longest_idle_connection_makes_room_and_busy_ones_never_do() -> None:
    async def run() -> None:
        async with serving() as connect:
            oldest, oldest_protocol = await connect()
            _, newer_protocol = await connect()
            busy, busy_protocol = await connect()
            busy.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n")
            await asyncio.sleep(0.05)
            connections = [newer_protocol, busy_protocol, oldest_protocol]
            assert close_longest_idle(connections)
            assert await _until_closed(oldest) == b""
            assert close_longest_idle(connections)
            assert newer_protocol.transport.is_closing()
            assert not close_longest_idle(connections)
            assert not busy_protocol.transport.is_closing()

    asyncio.run(run())


def test_the_connection_cap_stays_below_the_descriptor_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10) == 10
    assert connection_cap(10**9) < soft


def test_an_idle_connection_asked_to_close_closes_after_its_next_answer() -> None:
    async def run() -> tuple[bytes, bytes]:
        async with serving() as connect:
            client_end, protocol = await connect()
            client_end.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            first = await _answer(client_end)
            # Idle between requests: a rebalance asks it to reconnect.
            assert close_after_answer([protocol], 1) == 1
            assert not protocol.transport.is_closing()
            client_end.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            return first, await _until_closed(client_end)

    first, second = asyncio.run(run())
    assert b"connection: close" not in first
    assert second.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nconnection: close\r\n" in second


def test_a_body_still_arriving_after_an_early_answer_is_timed_as_a_body_not_a_head() -> None:
    async def run() -> None:
        async with serving(early) as connect:
            client_end, protocol = await connect()
            loop = asyncio.get_running_loop()
            head = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 40000\r\n\r\n"
            await loop.sock_sendall(client_end, head + b"x" * 100)
            assert (await _answer(client_end)).startswith(b"HTTP/1.1 200 OK\r\n")
            # More body than a head may hold: still body, not a head too large.
            await loop.sock_sendall(client_end, b"x" * 30000)
            await asyncio.sleep(0.05)
            assert protocol.head_deadline is None
            assert protocol.body_deadline is not None
            await loop.sock_sendall(client_end, b"x" * 9900)
            await asyncio.sleep(0.05)
            assert protocol.body_deadline is None
            assert protocol.head_deadline is not None
            assert not protocol.transport.is_closing()

    asyncio.run(run())


def test_a_connection_that_ends_tells_the_worker_once_it_has_left_its_set() -> None:
    # DrainingServer publishes the worker's count to its siblings then: a
    # count left high until the next heartbeat had a sibling take a whole
    # burst of new connections against connections that were gone.
    async def run() -> list[int]:
        left: list[int] = []
        async with serving() as connect:
            client_end, protocol = await connect()
            protocol.on_connection_lost = lambda: left.append(len(protocol.connections))
            assert protocol in protocol.connections
            client_end.close()
            async with asyncio.timeout(10):
                while not left:  # noqa: ASYNC110 - the protocol signals nothing else
                    await asyncio.sleep(0.01)
        return left

    assert asyncio.run(run()) == [0]
