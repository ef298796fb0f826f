"""Every response leaves the worker's HTTP protocol in one transport write,
byte for byte what uvicorn's own protocol sends in two."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.server.turn_writes import JOIN_LIMIT_BYTES
from service.server.worker import (
    CONNECTION_CLOSE,
    IN_PROGRESS,
    WholeResponseProtocol,
)
from service.shedding import REQUESTS_AHEAD

App = Callable[[Any, Any, Any], Awaitable[None]]
GET = b"GET /thing HTTP/1.1\r\nHost: test\r\n\r\n"
# The last request of each exchange asks the server to close after answering:
# the client then reads to the end of the connection.
LAST_GET = b"GET /thing HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
BODY = b'{"predicted_class":0}'


class CountedTransport:
    """The real transport, with its write calls counted."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.calls: list[str] = []

    def write(self, data: bytes) -> None:
        self.calls.append("write")
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.calls.append("writelines")
        self._transport.writelines(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def _exchange(
    protocol_class: type[HttpToolsProtocol],
    app: App,
    request: bytes,
    default_headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[bytes, list[str]]:
    """Serve one connection with a real transport: what the client read until
    the server closed it, and the transport calls that carried it."""
    config = Config(app=app, lifespan="off", log_config=None)
    state = ServerState()
    state.default_headers = default_headers or []
    counted: list[CountedTransport] = []

    class Counting(protocol_class):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            # The writes the protocol makes, above the worker's end-of-turn
            # holding (tests/unit/test_turn_writes.py pins that one).
            spy = CountedTransport(self.transport)  # type: ignore[has-type]
            counted.append(spy)
            self.transport = spy

    loop = asyncio.get_running_loop()
    server_end, client_end = socket.socketpair()
    client_end.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(
        lambda: Counting(config=config, server_state=state, app_state={}), server_end
    )
    await loop.sock_sendall(client_end, request)
    received = b""
    # Generous: only a server that never closes would reach it.
    async with asyncio.timeout(30):
        while chunk := await loop.sock_recv(client_end, 1 << 20):
            received += chunk
    transport.close()
    client_end.close()
    return received, counted[0].calls


def _both(app: App, request: bytes = LAST_GET, **kwargs: Any) -> tuple[bytes, list[str], list[str]]:
    async def run() -> tuple[bytes, list[str], bytes, list[str]]:
        stock = await _exchange(HttpToolsProtocol, app, request, **kwargs)
        ours = await _exchange(WholeResponseProtocol, app, request, **kwargs)
        return (*stock, *ours)

    stock_bytes, stock_calls, our_bytes, our_calls = asyncio.run(run())
    assert our_bytes == stock_bytes
    assert stock_bytes
    return our_bytes, our_calls, stock_calls


def _responder(body: bytes, *, parts: int = 1) -> App:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % (len(body) * parts)),
                ],
            }
        )
        for part in range(parts):
            await send({"type": "http.response.body", "body": body, "more_body": part < parts - 1})

    return app


def test_a_fast_path_answer_leaves_in_one_write_where_uvicorn_uses_two() -> None:
    received, ours, stock = _both(_responder(BODY))
    assert received.endswith(b"\r\n\r\n" + BODY)
    assert ours == ["write"]
    assert stock == ["write", "write"]


def test_keep_alive_requests_in_a_row_each_leave_in_one_write() -> None:
    received, ours, _ = _both(_responder(BODY), GET * 2 + LAST_GET)
    assert received.count(BODY) == 3
    assert ours == ["write"] * 3


def test_a_head_request_sends_its_head_alone_in_one_write() -> None:
    # The first stays open (its head leaves after the body message), the second closes.
    head_requests = (GET + LAST_GET).replace(b"GET", b"HEAD")
    received, ours, _ = _both(_responder(BODY), head_requests)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert BODY not in received
    assert ours == ["write", "write"]


def test_a_streamed_answer_joins_its_head_to_the_first_part_only() -> None:
    received, ours, stock = _both(_responder(BODY, parts=3))
    assert received.endswith(BODY * 3)
    assert ours == ["write"] * 3
    assert stock == ["write"] * 4


def test_a_large_body_is_handed_over_with_its_head_without_joining() -> None:
    body = b"x" * JOIN_LIMIT_BYTES
    received, ours, _ = _both(_responder(body))
    assert received.endswith(body)
    assert ours == ["writelines"]


def test_a_draining_answer_still_says_connection_close_and_closes() -> None:
    received, ours, _ = _both(_responder(BODY), GET * 2, default_headers=[CONNECTION_CLOSE])
    assert b"\r\nconnection: close\r\n" in received
    assert received.count(BODY) == 1
    assert ours == ["write"]


def _with_headers(headers: list[tuple[bytes, bytes]], body: bytes = BODY, status: int = 200) -> App:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


LENGTH = (b"content-length", b"%d" % len(BODY))


@pytest.mark.parametrize(
    "headers",
    [
        [LENGTH],
        [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(BODY))],
        [LENGTH, (b"x-request-id", b"abc"), (b"x-request-id", b"def")],
        [LENGTH, (b"content-length", b"%d" % len(BODY))],
        [LENGTH, (b"connection", b"keep-alive, Close")],
        [LENGTH, (b"x-tab", b"a\tb"), (b"x-empty", b"")],
        [(b"transfer-encoding", b"chunked"), LENGTH],
        [LENGTH, (b"transfer-encoding", b"chunked")],
        [],
    ],
    ids=[
        "length only",
        "upper-case names",
        "a repeated name",
        "two lengths",
        "connection close",
        "tab and empty values",
        "chunked before length",
        "length before chunked",
        "no headers",
    ],
)
def test_a_head_is_byte_for_byte_uvicorns_whatever_its_headers(
    headers: list[tuple[bytes, bytes]],
) -> None:
    # Twice on one connection: the second head may take the path for names seen before.
    received, _, _ = _both(
        _with_headers(headers), GET + LAST_GET, default_headers=[(b"server", b"t")]
    )
    assert received.count(b"HTTP/1.1 200 OK\r\n") in (1, 2)


@pytest.mark.parametrize("status", [204, 304, 404])
def test_a_head_without_length_is_uvicorns_too(status: int) -> None:
    _both(_with_headers([(b"x-thing", b"1")], body=b"", status=status), GET + LAST_GET)


@pytest.mark.parametrize(
    "header",
    [(b"bad name", b"v"), (b"bad:name", b"v"), (b"x-value", b"a\r\nb"), (b"x-value", b"\x00")],
)
def test_an_invalid_header_fails_the_answer_as_in_uvicorn(header: tuple[bytes, bytes]) -> None:
    app = _with_headers([LENGTH, header])

    async def run() -> tuple[bytes, bytes]:
        stock, _ = await _exchange(HttpToolsProtocol, app, LAST_GET)
        ours, _ = await _exchange(WholeResponseProtocol, app, LAST_GET)
        return stock, ours

    stock, ours = asyncio.run(run())
    # The answer had started: the connection closes with nothing sent.
    assert ours == stock == b""


@pytest.mark.parametrize("body", [BODY[:-1], BODY + b"!"], ids=["shorter", "longer"])
def test_a_body_that_does_not_match_its_length_is_cut_off_as_in_uvicorn(body: bytes) -> None:
    _both(_with_headers([LENGTH], body=body))


def test_an_app_that_fails_after_the_head_still_sends_that_head_before_closing() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("broken after the head")

    received, ours, _ = _both(app)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert ours == ["write"]


def test_a_server_error_answer_is_one_write_too() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("broken before the head")

    received, ours, _ = _both(app)
    assert received.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert received.endswith(b"Internal Server Error")
    assert ours == ["write"]


@pytest.mark.parametrize("expect_continue", [True, False])
def test_a_request_body_is_read_before_the_one_write(expect_continue: bool) -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        await _responder(message["body"])(scope, receive, send)

    head = b"POST /thing HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 4\r\n"
    if expect_continue:
        head += b"Expect: 100-continue\r\n"
    received, ours, _ = _both(echo, head + b"\r\nbody")
    assert received.endswith(b"\r\n\r\nbody")
    assert ours == ["write", "write"] if expect_continue else ["write"]


def test_each_request_is_told_the_requests_received_and_not_yet_answered() -> None:
    async def run() -> None:
        release = asyncio.Event()
        arrived: asyncio.Queue[int] = asyncio.Queue()

        async def held(scope: Any, receive: Any, send: Any) -> None:
            arrived.put_nowait(scope[REQUESTS_AHEAD])
            await release.wait()
            await _responder(BODY)(scope, receive, send)

        config = Config(app=held, lifespan="off", log_config=None)
        state = ServerState()
        loop = asyncio.get_running_loop()

        async def connect() -> socket.socket:
            server_end, client_end = socket.socketpair()
            client_end.setblocking(False)
            await loop.connect_accepted_socket(
                lambda: WholeResponseProtocol(config=config, server_state=state, app_state={}),
                server_end,
            )
            return client_end

        async with asyncio.timeout(30):
            clients = [await connect() for _ in range(3)]
            for client_end in clients:
                await loop.sock_sendall(client_end, LAST_GET)
            assert [await arrived.get() for _ in clients] == [0, 1, 2]
            assert IN_PROGRESS.count == 3
            release.set()
            for client_end in clients:
                while await loop.sock_recv(client_end, 65536):
                    pass
                client_end.close()
            assert IN_PROGRESS.count == 0

            # A pipelined request still queued when its connection goes counts no more.
            release.clear()
            client_end = await connect()
            await loop.sock_sendall(client_end, GET + GET)
            assert await arrived.get() == 0
            assert IN_PROGRESS.count == 2
            client_end.close()
            release.set()
            while IN_PROGRESS.count:  # noqa: ASYNC110 - the count signals nothing
                await asyncio.sleep(0.01)

    asyncio.run(run())


@dataclass
class Served:
    """One connection of the worker's protocol, as its app can see it."""

    client: socket.socket
    # Under the protocol's turn-end holding: what reaches the socket.
    socket_writes: list[str] = field(default_factory=list)


def _serve_one(app_for: Callable[[Served], App], *requests: bytes) -> tuple[bytes, Served]:
    """Serves one connection with the worker's protocol on uvloop, as workers
    run, its requests sent one after another's answer (each answer holds
    BODY): what the client read until the server closed, and the connection."""

    async def run() -> tuple[bytes, Served]:
        loop = asyncio.get_running_loop()
        server_end, client_end = socket.socketpair()
        client_end.setblocking(False)
        served = Served(client_end)
        config = Config(app=app_for(served), lifespan="off", log_config=None)

        class Spied(WholeResponseProtocol):
            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                spy = CountedTransport(transport)
                spy.calls = served.socket_writes
                super().connection_made(cast(asyncio.Transport, spy))

        await loop.connect_accepted_socket(
            lambda: Spied(config=config, server_state=ServerState(), app_state={}), server_end
        )
        received = b""
        async with asyncio.timeout(30):
            for sent, one in enumerate(requests, start=1):
                await loop.sock_sendall(client_end, one)
                if sent < len(requests):
                    # The next request only once this one is answered.
                    while received.count(BODY) < sent:
                        received += await loop.sock_recv(client_end, 1 << 20)
            while chunk := await loop.sock_recv(client_end, 1 << 20):
                received += chunk
        client_end.close()
        return received, served

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())


@pytest.fixture
def another_request_in_progress() -> Iterator[None]:
    """The worker busy with a request on some other connection."""
    IN_PROGRESS.count += 1
    yield
    IN_PROGRESS.count -= 1


def _socket_writes_once_sent(*requests: bytes) -> tuple[bytes, list[list[str]]]:
    """What the client read, and the socket writes made when each answer's send returned."""
    written_once_sent: list[list[str]] = []

    def app_for(served: Served) -> App:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await _responder(BODY)(scope, receive, send)
            written_once_sent.append(list(served.socket_writes))

        return app

    received, _ = _serve_one(app_for, *requests)
    return received, written_once_sent


@pytest.mark.usefixtures("another_request_in_progress")
def test_a_busy_worker_holds_an_answer_until_the_turn_ends() -> None:
    # The first answer keeps its connection; the second closes it, which
    # sends what is held at once.
    received, written_once_sent = _socket_writes_once_sent(GET, LAST_GET)
    assert received.count(b"\r\n\r\n" + BODY) == 2
    assert written_once_sent[0] == []


def test_a_lone_requests_answer_leaves_at_once() -> None:
    received, written_once_sent = _socket_writes_once_sent(GET, LAST_GET)
    assert received.count(b"\r\n\r\n" + BODY) == 2
    assert written_once_sent[0] == ["write"]


@pytest.mark.usefixtures("another_request_in_progress")
def test_a_client_that_half_closes_after_its_request_still_gets_the_answer() -> None:
    # Its end of file is read while the answer is held, and uvloop closes the
    # transport on it: the answer must leave first.
    def app_for(served: Served) -> App:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            served.client.shutdown(socket.SHUT_WR)
            await _responder(BODY)(scope, receive, send)

        return app

    received, _ = _serve_one(app_for, GET)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"\r\n\r\n" + BODY)
