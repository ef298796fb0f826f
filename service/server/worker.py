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
pinned by tests/unit/test_worker_internals.py. The httptools protocol's
per-request methods are carried here as copies with our additions, rather
than wrapped (a wrapper is a second call a request, and uvicorn arms and
cancels a keep-alive timer for every request where ours arms one a period);
the test pins the uvicorn source they were copied from.

Its HTTP protocol (WholeResponseProtocol) sends each response's head and the
first part of its body in one transport write: a worker killed mid-answer
(SIGKILL, the OOM killer) leaves a client or proxy either a whole response or
none, never a head it has already passed on and cannot retry. It also tells
each request how many were in progress when it arrived (load shedding,
service.shedding) and bounds what a directly connected client can hold: the
size of a request head, the time a head and a body take to arrive, and the
number of open connections (idle ones make room for new ones at the cap).
While other requests are in progress, each connection's writes wait for the
end of the event loop's turn (service.server.turn_writes), so a loaded
worker's answers leave together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import sys
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import httptools
from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from service.server.acceptor import (
    ACCEPT_BATCH,
    LEDGER_ENV,
    BalancedAcceptor,
    ConnectionLedger,
    WorkerLoad,
)
from service.server.turn_writes import JOIN_LIMIT_BYTES, TurnEndTransport, TurnWrites
from service.settings import ServerSettings
from service.shedding import REQUESTS_AHEAD

if TYPE_CHECKING:
    from service.metrics.connections import ClosedReason

log = logging.getLogger("ml_api")

# The least a drain waits for a just-accepted connection's request, even with
# keep-alive off (KEEPALIVE=0).
ACCEPTED_REQUEST_GRACE_SECONDS = 0.25
DRAIN_POLL_SECONDS = 0.05
# The heartbeat Gunicorn's master watches (TIMEOUT) stops with uvicorn's main
# loop: a drain beats it itself, this often.
DRAIN_HEARTBEAT_SECONDS = 1.0
CONNECTION_CLOSE = (b"connection", b"close")
# A keep-alive timer this close to its deadline counts as expired (see _keep_alive_expired).
KEEPALIVE_TIMER_SLACK_SECONDS = 0.001
# How often connections are checked against their head and body deadlines.
DEADLINE_SWEEP_SECONDS = 1.0
# File descriptors a worker keeps for everything but client connections
# (listening sockets, the bundle, metric and log files, the ledger).
RESERVED_FDS = 128


def count_closed(reason: ClosedReason) -> None:
    # Imported on the first close: a worker that never closes one loads nothing.
    from service.metrics.connections import count_closed as count

    count(reason)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold (see ServerSettings)."""

    head_bytes: int = 16 * 1024
    head_timeout: float = 10.0
    body_timeout: float = 30.0

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ConnectionLimits:
        return cls(
            settings.max_request_head_bytes,
            settings.request_head_timeout,
            settings.request_body_timeout,
        )


def connection_cap(wanted: int) -> int:
    """MAX_CONNECTIONS_PER_WORKER, kept below this process's descriptor limit:
    a worker out of descriptors cannot accept, open a file or answer anyone."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    # The acceptor may exceed the cap by a batch of connections still handshaking.
    return max(1, min(wanted, soft - RESERVED_FDS - ACCEPT_BATCH))


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
        # Up to the copy bound, one bytes object (which a busy turn can hold);
        # past it, handed over together (writelines, one writev in uvloop).
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


# Header names seen valid and lowercase (uvicorn's check, and what it
# writes): a head of such names only is checked and joined in C. Apps send
# a few fixed names; the bound keeps names a client might echo from growing it.
_CHECKED_NAMES: set[bytes] = set()
MAX_CHECKED_NAMES = 64


class WholeResponseCycle(RequestResponseCycle):
    """uvicorn's request cycle, its head held until the body (see HeldHead).

    The usual answer (a head with its content-length, then the whole body in
    one message) is written here rather than by uvicorn's send, which costs
    half again as much: it copies the headers, runs two regexes a header and
    writes the head to be held. Everything else (a streamed or chunked body,
    HEAD, a paused or lost connection, uvicorn's own access log) takes
    uvicorn's send, the head held as before.
    """

    transport: HeldHead  # type: ignore[assignment]

    async def run_asgi(self, app: Any) -> None:
        # uvicorn's run_asgi (tests/unit/test_worker_internals.py compares the
        # two), the request counted out at its end: one coroutine a request, not two.
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if result is not None:
                msg = "ASGI callable should return None, but returned '%s'."
                self.logger.error(msg, result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = lambda: None
            IN_PROGRESS.count -= 1

    async def send(self, message: Any) -> None:
        transport = self.transport
        if self.flow.write_paused or self.disconnected or self.access_log:
            await self._uvicorn_send(message)
        elif not self.response_started:
            if message["type"] != "http.response.start":
                await self._uvicorn_send(message)  # uvicorn's error
                return
            transport.head = self._head(message)
        elif (
            not self.response_complete
            and not self.chunked_encoding
            and message["type"] == "http.response.body"
            and not message.get("more_body", False)
            and len(body := message.get("body", b"")) == self.expected_content_length
            and self.scope["method"] != "HEAD"
        ):
            # What uvicorn's send does for a last body part, in one write with the head.
            transport.write(body)
            self.expected_content_length = 0
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                transport.close()
            self.on_response()
        else:
            await self._uvicorn_send(message)

    async def _uvicorn_send(self, message: Any) -> None:
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

    def _head(self, message: Any) -> bytes:
        """The status line and headers, exactly as uvicorn's send writes them
        (tests/unit/test_whole_responses.py compares the bytes)."""
        self.response_started = True
        self.waiting_for_100_continue = False
        headers = [*self.default_headers, *message.get("headers", ())]
        by_name = dict(headers)
        length = by_name.get(b"content-length")
        if (
            length is None
            or len(by_name) != len(headers)
            or not _CHECKED_NAMES.issuperset(by_name)
            or b"transfer-encoding" in by_name
            or b"connection" in by_name
            or HEADER_VALUE_RE.search(b"".join(by_name.values()))
        ):
            return self._head_header_by_header(message["status"], headers)
        # The usual head: every name already lowercase and valid, each once,
        # a content-length and nothing that changes how the body is framed:
        # its values checked in one search, its lines joined in C.
        self.expected_content_length = int(length.decode())
        self.chunked_encoding = False
        close = b"" if self.keep_alive else b"connection: close\r\n"
        lines = b"\r\n".join(map(b": ".join, headers))
        return b"%s%s\r\n%s\r\n" % (STATUS_LINE[message["status"]], lines, close)

    def _head_header_by_header(self, status_code: int, headers: list[Any]) -> bytes:
        """uvicorn's own loop over the headers (its send, writing nothing)."""
        content = [STATUS_LINE[status_code]]
        has_connection_close = False
        for name, value in headers:
            if HEADER_RE.search(name):
                raise RuntimeError("Invalid HTTP header name.")
            if HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header value.")
            lower = name.lower()
            if lower == name and len(_CHECKED_NAMES) < MAX_CHECKED_NAMES:
                _CHECKED_NAMES.add(name)
            name = lower
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
                if b"close" in connection:
                    self.keep_alive = False
                    has_connection_close = True
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status_code not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)


class WholeResponseProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, every response in one write (see
    WholeResponseCycle), each request told how many were ahead of it, and
    bounds on what a client can hold: the head's size, the time its head and
    its body take to arrive. httptools has no head limit of its own, and
    uvicorn's only timer is for an idle keep-alive connection, reset by any
    byte: a head trickled a byte at a time, or a connection that never sends,
    stays open forever."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    # Set while the connection waits for a request head: from the connection
    # or the previous answer (None while a request is in progress).
    head_deadline: float | None = None
    # Bytes received toward the head awaited (from the start of the chunk in
    # which it began at the latest: a chunk that also ends a body is not
    # counted, so a limit is exceeded by at most one read).
    head_bytes = 0
    body_deadline: float | None = None
    # When an idle keep-alive connection is closed: set by each answer, unset
    # by the next bytes (KEEPALIVE; uvicorn's timeout_keep_alive).
    keepalive_deadline: float | None = None
    _keepalive_timer: asyncio.TimerHandle | None = None

    # Set by close_after_answer on an idle connection: its next answer closes it.
    close_after_next_answer = False
    # The connection's transport as uvicorn's code sees it: its writes held
    # until the loop's turn ends while other requests are in progress.
    held_writes: TurnEndTransport
    # Called once the connection has left the worker's set: DrainingServer
    # publishes the worker's count then (see WorkerLoad.connection_left).
    on_connection_lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Every write of this connection, uvicorn's included, leaves at the
        # end of the loop's turn when other requests are in progress
        # (service.server.turn_writes).
        self.held_writes = TurnEndTransport(transport, TurnWrites.of(self.loop), IN_PROGRESS)
        super().connection_made(cast(asyncio.Transport, self.held_writes))
        self._await_head()

    def eof_received(self) -> None:
        # A client that half-closes after its request still waits for the
        # answer: uvloop closes the transport when this returns (uvicorn's
        # returns None too), around the held writes, so they leave first.
        self.held_writes.flush()

    def data_received(self, data: bytes) -> None:
        # Not idle: the keep-alive timer, when it fires, finds no deadline.
        self.keepalive_deadline = None
        awaiting_head = self.head_deadline is not None
        if awaiting_head:
            self.head_bytes += len(data)
        # uvicorn's data_received, whose keep-alive timer is never armed.
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        # Checked after parsing: the same chunk may hold a small head and a large body.
        if (
            awaiting_head
            and self.head_deadline is not None
            and self.head_bytes > self.limits.head_bytes
            and not self.transport.is_closing()
        ):
            self.refuse(431, f"request head larger than {self.limits.head_bytes} bytes")
            count_closed("head_too_large")

    def on_headers_complete(self) -> None:
        # uvicorn's on_headers_complete (tests/unit/test_worker_internals.py
        # pins the copy), making a WholeResponseCycle, its head held, in one
        # step rather than switching the class of uvicorn's cycle afterwards.
        self.head_deadline = None
        self.head_bytes = 0
        self.body_deadline = self.loop.time() + self.limits.body_timeout
        parser, scope = self.parser, self.scope
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = parsed_url.query or b""
        # The worker's requests in progress as this one arrives, for load
        # shedding (service.shedding).
        scope[REQUESTS_AHEAD] = IN_PROGRESS.count  # type: ignore[literal-required]
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app: Any = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self.app
        existing_cycle = self.cycle
        self.cycle = WholeResponseCycle(
            scope=scope,
            transport=HeldHead(self.transport),  # type: ignore[arg-type]
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        # Started at once or queued behind a pipelined request: in progress
        # either way (see connection_lost).
        IN_PROGRESS.count += 1
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    def on_message_complete(self) -> None:
        self.body_deadline = None
        cycle = self.cycle
        # uvicorn's on_message_complete, and the connection idle once answered.
        if cycle is None or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        if cycle.response_complete:
            # The body's end came after an early answer (a 413, say).
            self._await_head()
            return
        cycle.more_body = False
        cycle.message_event.set()

    def on_response_complete(self) -> None:
        # uvicorn's, but its keep-alive timer is not armed and cancelled for
        # every request (two event-loop timer operations): one timer stays
        # armed while the connection is used and re-arms itself when it finds
        # the connection answered again since (see _keep_alive_expired).
        self.server_state.total_requests += 1
        now = self.loop.time()
        if not self.transport.is_closing():
            flow = self.flow
            if flow.read_paused:
                flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self.keepalive_deadline = now + self.timeout_keep_alive
                if self._keepalive_timer is None:
                    self._keepalive_timer = self.loop.call_at(
                        self.keepalive_deadline, self._keep_alive_expired
                    )
        cycle = self.cycle
        # Idle now, unless a pipelined request (its head already here) started
        # or the rest of this request's body is still on its way.
        if (cycle is None or cycle.response_complete) and self.body_deadline is None:
            self._await_head(now)

    def _keep_alive_expired(self) -> None:
        self._keepalive_timer = None
        deadline = self.keepalive_deadline
        if deadline is None or self.transport.is_closing():
            # A request since: the timer is armed again after its answer.
            return
        # uvloop's timers count whole milliseconds: one may fire a fraction of
        # one early, and re-arming it for that fraction would spin until it passed.
        if deadline - self.loop.time() > KEEPALIVE_TIMER_SLACK_SECONDS:
            self._keepalive_timer = self.loop.call_at(deadline, self._keep_alive_expired)
        else:
            self.timeout_keep_alive_handler()

    def _await_head(self, now: float | None = None) -> None:
        self.head_bytes = 0
        self.head_deadline = (self.loop.time() if now is None else now) + self.limits.head_timeout

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if self.close_after_next_answer:
            cycle.keep_alive = False
        if self.config.reset_contextvars:
            super()._start_asgi_task(cycle, app)
            return
        # uvicorn's, without the option checked above.
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def connection_lost(self, exc: Exception | None) -> None:
        # Pipelined requests still queued behind one in progress never start now.
        IN_PROGRESS.count -= len(self.pipeline)
        self.head_deadline = self.body_deadline = self.keepalive_deadline = None
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        super().connection_lost(exc)
        if self.on_connection_lost is not None:
            self.on_connection_lost()

    def expire(self, now: float) -> None:
        """Close the connection if its head or body is overdue."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.head_deadline is not None and now >= self.head_deadline:
            if self.head_bytes:
                self.refuse(408, f"request head not received within {self.limits.head_timeout} s")
            else:
                self.transport.close()
            count_closed("head_timeout")
        elif self.body_deadline is not None and now >= self.body_deadline:
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                # The application waiting for the body sees the client leave.
                self.refuse(408, f"request body not received within {self.limits.body_timeout} s")
            else:
                self.transport.close()
            count_closed("body_timeout")

    def refuse(self, status: int, message: str) -> None:
        """Answer in plain text and close, as uvicorn answers a malformed request."""
        self.head_deadline = self.body_deadline = None
        body = message.encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))
        self.transport.close()

    @property
    def idle(self) -> bool:
        return self.head_deadline is not None and not self.transport.is_closing()


def expire_overdue(connections: Iterable[object], now: float) -> None:
    for protocol in list(connections):
        if isinstance(protocol, WholeResponseProtocol):
            protocol.expire(now)


def close_longest_idle(connections: Iterable[object]) -> bool:
    """Make room at the connection cap: close the connection that has waited
    longest for a request head (an idle keep-alive one, or one that never sent
    anything), so a flood of idle connections cannot lock clients out.
    False when every connection has a request in progress."""
    oldest: WholeResponseProtocol | None = None
    for protocol in connections:
        if (
            isinstance(protocol, WholeResponseProtocol)
            and protocol.idle
            and (oldest is None or protocol.head_deadline < oldest.head_deadline)  # type: ignore[operator]
        ):
            oldest = protocol
    if oldest is None:
        return False
    oldest.head_deadline = None
    oldest.transport.close()
    count_closed("idle_evicted")
    return True


def _accepting() -> None:
    # After the lifespan (a model loaded, its heap frozen): from here on the
    # worker takes connections. Until then a sibling takes them all, so
    # whoever waits for every worker (tests, an operator) waits for this.
    log.info("accepting connections")


class DrainingServer(Server):
    _load: WorkerLoad | None = None
    # Set by the worker from Gunicorn's settings (see drain_seconds).
    drain_limit_seconds = ACCEPTED_REQUEST_GRACE_SECONDS
    # Set by the worker from MAX_CONNECTIONS_PER_WORKER (see connection_cap).
    max_connections = 1000

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop ticks every 0.1 s.
        if counter % round(DEADLINE_SWEEP_SECONDS * 10) == 0:
            expire_overdue(self.server_state.connections, asyncio.get_running_loop().time())
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        ledger = os.environ.get(LEDGER_ENV)
        if sockets is None or not ledger:
            await super().startup(sockets=sockets)
            _accepting()
            return
        # An empty list: uvicorn runs the lifespan and creates no listeners;
        # the acceptors below are the listeners.
        await super().startup(sockets=[])
        config, state = self.config, self.server_state

        load = self._load = WorkerLoad(
            ConnectionLedger(Path(ledger)),
            state.connections,
            shed=lambda count: close_after_answer(state.connections, count),
        )

        def create_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state=self.lifespan.state
            )
            if isinstance(protocol, WholeResponseProtocol):
                protocol.on_connection_lost = load.connection_left
            return protocol

        load.start()
        acceptors = [
            BalancedAcceptor(
                sock,
                create_protocol,
                self._load,
                self.max_connections,
                make_room=lambda: close_longest_idle(state.connections),
            )
            for sock in sockets
        ]
        # uvicorn's shutdown only calls close() and wait_closed() on these.
        self.servers = acceptors  # type: ignore[assignment]
        _accepting()

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
        settings = ServerSettings()
        server.max_connections = connection_cap(settings.max_connections_per_worker)
        WholeResponseProtocol.limits = ConnectionLimits.from_settings(settings)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        # Gunicorn halts the whole server on this code. A model problem never
        # gets here (the lifespan starts not ready and retries instead): only a
        # broken installation or configuration does.
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
