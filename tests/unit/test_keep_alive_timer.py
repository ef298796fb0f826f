"""An idle keep-alive connection closes KEEPALIVE seconds after its last answer,
as in uvicorn, with one timer a period instead of one armed and cancelled a request."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

from service.server.worker import WholeResponseProtocol

GET = b"GET /thing HTTP/1.1\r\nHost: test\r\n\r\n"
# Long enough that a loaded machine's stalls between a test's requests stay
# well inside it (a stall past it would close the connection for real).
KEEPALIVE_SECONDS = 1.0


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def _on_uvloop(main: Coroutine[Any, Any, None]) -> None:
    """The loop the workers run (uvicorn picks uvloop when it is installed)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


@asynccontextmanager
async def _connection(
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[tuple[socket.socket, WholeResponseProtocol]]:
    # Typed int, used as a float (a loop timer's delay).
    timeout: Any = keepalive
    config = Config(app=_ok, lifespan="off", log_config=None, timeout_keep_alive=timeout)
    config.load()
    loop = asyncio.get_running_loop()
    server_end, client_end = socket.socketpair()
    client_end.setblocking(False)
    made: list[WholeResponseProtocol] = []

    def factory() -> WholeResponseProtocol:
        protocol = WholeResponseProtocol(config=config, server_state=ServerState(), app_state={})
        made.append(protocol)
        return protocol

    transport, _ = await loop.connect_accepted_socket(factory, server_end)
    try:
        async with asyncio.timeout(30):
            yield client_end, made[0]
    finally:
        transport.close()
        client_end.close()


async def _ask(client_end: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(client_end, GET)
    answer = b""
    while not answer.endswith(b"\r\n\r\nok"):
        chunk = await loop.sock_recv(client_end, 65536)
        assert chunk, f"closed after {answer!r}"
        answer += chunk
    return answer


# uvloop's timers count whole milliseconds (the worker's expiry allows for one).
TIMER_RESOLUTION = 0.002


async def _closed_at(client_end: socket.socket) -> float:
    """When the client saw the server close (on the loop the server runs on:
    a delay here only makes it later, never earlier)."""
    loop = asyncio.get_running_loop()
    assert await loop.sock_recv(client_end, 65536) == b""
    return loop.time()


def test_an_idle_connection_is_closed_keep_alive_seconds_after_its_last_answer() -> None:
    async def run() -> None:
        async with _connection() as (client_end, protocol):
            answered = asyncio.get_running_loop().time()
            await _ask(client_end)
            deadline = protocol.keepalive_deadline
            assert deadline is not None
            assert deadline >= answered + KEEPALIVE_SECONDS
            assert await _closed_at(client_end) >= deadline - TIMER_RESOLUTION

    _on_uvloop(run())


def test_answers_in_the_meantime_move_the_close_to_keep_alive_seconds_after_the_last() -> None:
    async def run() -> None:
        async with _connection() as (client_end, protocol):
            # Across a whole period: the timer armed by the first answer
            # finds later answers and arms itself again, never closing early.
            first_deadline = None
            for _ in range(6):
                await _ask(client_end)
                first_deadline = first_deadline or protocol.keepalive_deadline
                await asyncio.sleep(KEEPALIVE_SECONDS / 4)
            deadline = protocol.keepalive_deadline
            assert first_deadline is not None
            assert deadline is not None
            assert deadline > first_deadline + KEEPALIVE_SECONDS
            assert await _closed_at(client_end) >= deadline - TIMER_RESOLUTION

    _on_uvloop(run())


def test_one_timer_serves_every_answer_of_a_busy_connection() -> None:
    async def run() -> None:
        # A period far longer than the burst: the first answer's timer is
        # still armed at the last.
        async with _connection(keepalive=60) as (client_end, protocol):
            await _ask(client_end)
            timer = protocol._keepalive_timer
            assert timer is not None
            for _ in range(50):
                await _ask(client_end)
                assert protocol._keepalive_timer is timer
            # uvicorn's own per-request timer is never armed.
            assert protocol.timeout_keep_alive_task is None

    _on_uvloop(run())


def test_a_request_in_progress_is_not_closed_by_the_keep_alive_timer() -> None:
    release = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await _ok(scope, receive, send)

    async def run() -> None:
        async with _connection() as (client_end, protocol):
            await _ask(client_end)
            protocol.app = slow
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(client_end, GET)
            # Past the deadline the first answer set: the timer fires, finds
            # a request in progress, and leaves the connection open.
            await asyncio.sleep(KEEPALIVE_SECONDS * 1.5)
            assert not protocol.transport.is_closing()
            release.set()
            answer = b""
            while not answer.endswith(b"\r\n\r\nok"):
                answer += await loop.sock_recv(client_end, 65536)
            deadline = protocol.keepalive_deadline
            assert deadline is not None
            assert await _closed_at(client_end) >= deadline - TIMER_RESOLUTION

    _on_uvloop(run())
