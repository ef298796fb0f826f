"""The Gunicorn worker: `uvicorn_worker.UvicornWorker` with a gap-free shutdown
and connections spread evenly across workers.

Uvicorn's shutdown stops accepting and then at once closes every connection
that has no request in progress. A connection the worker accepted a moment
earlier, whose request bytes are still on their way, is closed unanswered, and
so is an idle keep-alive connection whose client is sending its next request
right then: during a SIGHUP rollout or a max_requests recycle that is a failed
request for a client that did nothing wrong. This server drains first: every
answer from then on carries `Connection: close`, and it waits (up to the
keep-alive timeout) for the connections to end that way, or by their own
keep-alive timer, before uvicorn closes whatever is left.

It also accepts through service.server.acceptor instead of asyncio's server, so a
burst of keep-alive connections is split between the workers instead of
landing on whichever woke first, and a worker far ahead of a sibling (which
just restarted, say) asks some of its connections to reconnect. This module is
the one place that relies on uvicorn's internals (Server.startup's listener
set-up, ServerState, the protocols' request cycle, the worker's _serve),
pinned by tests/unit/test_worker_internals.py.

Its HTTP protocol (WholeResponseProtocol) sends each response's head and the
first part of its body in one transport write: a worker killed mid-answer
(SIGKILL, the OOM killer) leaves a client or proxy either a whole response or
none, never a head it has already passed on and cannot retry.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from service.server.acceptor import LEDGER_ENV, BalancedAcceptor, ConnectionLedger, WorkerLoad
from service.shedding import REQUESTS_AHEAD

# The least a drain waits for a just-accepted connection's request, even with
# keep-alive off (KEEPALIVE=0).
ACCEPTED_REQUEST_GRACE_SECONDS = 0.25
DRAIN_POLL_SECONDS = 0.05
# The heartbeat Gunicorn's master watches (TIMEOUT) stops with uvicorn's main
# loop: a drain beats it itself, this often.
DRAIN_HEARTBEAT_SECONDS = 1.0
CONNECTION_CLOSE = (b"connection", b"close")
# A head and a first body part up to this size are joined into one bytes
# object; past it they are handed over together (writelines, one writev in
# uvloop) rather than copied.
JOIN_LIMIT_BYTES = 64 * 1024


def drain_seconds(keepalive: float, graceful_timeout: float) -> float:
    """How long a stopping worker waits for its connections to end: the
    keep-alive timeout (an idle connection's client may send until then), but
    at most half of Gunicorn's graceful timeout, so the requests still in
    progress afterwards and the lifespan's shutdown have the rest of it."""
    return max(ACCEPTED_REQUEST_GRACE_SECONDS, min(keepalive, graceful_timeout / 2))


def close_after_answer(connections: Iterable[object], count: int) -> int:
    """Ask up to `count` connections to close once an answer is sent: it goes
    out with `Connection: close`, as uvicorn's own graceful shutdown does it,
    so no request is lost and the client simply reconnects. A connection
    answering a request closes after that answer; an idle one of this
    worker's protocol after its next (closing it now could cut off a request
    on its way). Requests are answered within one event-loop turn, so at any
    given moment most connections are idle."""
    asked = 0
    for protocol in list(connections):
        if asked >= count:
            break
        cycle = getattr(protocol, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            if cycle.keep_alive and not cycle.response_started:
                cycle.keep_alive = False
                asked += 1
        elif getattr(protocol, "close_after_next_answer", None) is False:
            protocol.close_after_next_answer = True  # type: ignore[attr-defined]
            asked += 1
    return asked


class HeldHead:
    """The transport as one request cycle sees it: the head written on
    `http.response.start` is held and leaves with the first body write.
    uvicorn's cycle uses only write, close and is_closing."""

    __slots__ = ("head", "holding", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # Set while uvicorn writes the head: that one write is held.
        self.holding = False
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.holding:
            self.head = data
            return
        head = self.head
        if head is None:
            self.transport.write(data)
            return
        self.head = None
        if len(head) + len(data) <= JOIN_LIMIT_BYTES:
            self.transport.write(head + data)
        else:
            self.transport.writelines((head, data))

    def flush(self) -> None:
        """A head whose body wrote nothing (HEAD, a disconnect) goes out alone."""
        head = self.head
        if head is not None:
            self.head = None
            if not self.transport.is_closing():
                self.transport.write(head)

    def close(self) -> None:
        # The app failed between head and body: what went before still goes first.
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class RequestsInProgress:
    """Requests this worker has received and not finished answering. Not the
    length of uvicorn's set of request tasks: a finished task leaves that set
    a loop turn later, so every request arriving in a turn would count all
    those answered in the turn before."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


IN_PROGRESS = RequestsInProgress()


class WholeResponseCycle(RequestResponseCycle):
    """uvicorn's request cycle, its head held until the body (see HeldHead)."""

    transport: HeldHead  # type: ignore[assignment]

    async def run_asgi(self, app: Any) -> None:
        try:
            await super().run_asgi(app)
        finally:
            IN_PROGRESS.count -= 1

    async def send(self, message: Any) -> None:
        transport = self.transport
        if message["type"] == "http.response.start":
            transport.holding = True
            try:
                await super().send(message)
            finally:
                transport.holding = False
            return
        await super().send(message)
        transport.flush()


class WholeResponseProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, every response in one write (see
    WholeResponseCycle), each request told how many were ahead of it."""

    # Set by close_after_answer on an idle connection: its next answer closes it.
    close_after_next_answer = False

    def on_headers_complete(self) -> None:
        # The worker's requests in progress as this one arrives, for load
        # shedding (service.shedding).
        self.scope[REQUESTS_AHEAD] = IN_PROGRESS.count  # type: ignore[literal-required]
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:
            # Started at once or queued behind a pipelined request: in
            # progress either way (see connection_lost).
            IN_PROGRESS.count += 1

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Before its coroutine exists. A class switch rather than a wrapper:
        # no per-request closure and no reference cycle.
        cycle.__class__ = WholeResponseCycle
        cycle.transport = HeldHead(cycle.transport)  # type: ignore[assignment]
        if self.close_after_next_answer:
            cycle.keep_alive = False
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        # Pipelined requests still queued behind one in progress never start now.
        IN_PROGRESS.count -= len(self.pipeline)
        super().connection_lost(exc)


class DrainingServer(Server):
    _load: WorkerLoad | None = None
    # Set by the worker from Gunicorn's settings (see drain_seconds).
    drain_limit_seconds = ACCEPTED_REQUEST_GRACE_SECONDS

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        ledger = os.environ.get(LEDGER_ENV)
        if sockets is None or not ledger:
            await super().startup(sockets=sockets)
            return
        # An empty list: uvicorn runs the lifespan and creates no listeners;
        # the acceptors below are the listeners.
        await super().startup(sockets=[])
        config, state = self.config, self.server_state

        def create_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state=self.lifespan.state
            )
            return protocol

        self._load = WorkerLoad(
            ConnectionLedger(Path(ledger)),
            state.connections,
            shed=lambda count: close_after_answer(state.connections, count),
        )
        self._load.start()
        acceptors = [BalancedAcceptor(sock, create_protocol, self._load) for sock in sockets]
        # uvicorn's shutdown only calls close() and wait_closed() on these.
        self.servers = acceptors  # type: ignore[assignment]

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        if self._load is not None:
            # Out of the ledger: siblings stop deferring to a worker that no longer accepts.
            self._load.stop()
        for sock in sockets or []:
            sock.close()
        await self._drain()
        await super().shutdown(sockets=None)

    def _open_connections(self) -> int:
        handshaking = self._load.handshaking if self._load is not None else 0
        return len(self.server_state.connections) + handshaking

    async def _drain(self) -> None:
        """Let the open connections end after an answer, or idle out, before
        uvicorn closes the rest."""
        state = self.server_state
        # Both of uvicorn's protocols close a connection after an answer that
        # carries this header. Every request cycle is handed the list current
        # when it starts; uvicorn's main loop replaced it each second, but it
        # has ended, so the cycles started from now on get this one, and those
        # not yet answering are pointed at it.
        state.default_headers.append(CONNECTION_CLOSE)
        for protocol in list(state.connections):
            cycle = getattr(protocol, "cycle", None)
            if cycle is not None and not cycle.response_started:
                cycle.default_headers = state.default_headers
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_limit_seconds
        next_beat = loop.time() + DRAIN_HEARTBEAT_SECONDS
        # Polled, as uvicorn's own shutdown does: connections leave the set
        # from inside uvicorn's protocols, which signal nothing.
        while self._open_connections() and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
            if self.config.callback_notify is not None and loop.time() >= next_beat:
                next_beat = loop.time() + DRAIN_HEARTBEAT_SECONDS
                await self.config.callback_notify()


class DrainingUvicornWorker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        "http": WholeResponseProtocol,
    }

    async def _serve(self) -> None:
        # Same as the parent's _serve (uvicorn-worker 0.4), with DrainingServer.
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        server.drain_limit_seconds = drain_seconds(self.cfg.keepalive, self.cfg.graceful_timeout)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        # Gunicorn halts the whole server on this code. A model problem never
        # gets here (the lifespan starts not ready and retries instead): only a
        # broken installation or configuration does.
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
