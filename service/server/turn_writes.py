"""Answers written together at the end of the event loop's turn.

A loaded worker finishes several requests in one turn of its loop. Written
the moment each is ready, every answer wakes its client (wrk, nginx, a load
balancer on the same cores), and the scheduler hands that client the core in
the middle of the worker's turn: about one preemption a request, after which
the worker resumes with its caches cold. Held until the turn's ready callbacks
have run, the turn's answers leave one after another, and the worker is
preempted about once a turn instead (measured on two cores, 16 keep-alive
connections a worker: 0.8 to 0.55 context switches a request, 6 to 14 % more
requests a second for the production app; at 2 to 4 connections a worker,
about 3 % fewer).

Only a worker with another request in progress holds (HOLD_FROM_REQUESTS): a
lone request's answer has nothing to leave with, and held it would only wait
(one keep-alive client measured 82 µs a request written at once, 115 held).

An answer waits for the rest of its turn (the requests the worker had
already started) and the loop's next poll of its sockets, which does not
block while callbacks are ready. Bytes are held per connection and in order:
whatever a connection writes while it holds bytes is appended to them, and
closing it sends them first, so no path (an error answer, a drain, an
eviction) can overtake or drop an answer; the protocol sends them too when
its client half-closes (see flush), before uvloop closes the transport
itself. Writes past JOIN_LIMIT_BYTES go out at once, after what was held. A
worker killed before the turn's end has sent none of those answers, never
part of one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Protocol
from weakref import WeakKeyDictionary

# Answers are held only while at least this many requests are in progress,
# the one answered included: a lone request's answer leaves at once. Holding
# from 5 instead measured 3.6 % fewer requests a second at 16 connections a
# worker and 2.7 % more at 4.
HOLD_FROM_REQUESTS = 2
# Bytes are joined by copying up to this size: held bytes here, and a head
# with its body in the worker's protocol. Larger writes (a big batch answer)
# go out at once instead.
JOIN_LIMIT_BYTES = 64 * 1024


class RequestCount(Protocol):
    """The worker's requests received and not yet answered."""

    count: int


class TurnWrites:
    """One event loop's connections holding bytes until its turn ends."""

    __slots__ = ("held", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.held: list[TurnEndTransport] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> TurnWrites:
        turn = _TURNS.get(loop)
        if turn is None:
            turn = _TURNS[loop] = cls(loop)
        return turn

    def hold(self, transport: TurnEndTransport) -> None:
        if not self.held:
            # Runs after every callback already ready: the turn's other requests.
            self.loop.call_soon(self.flush)
        self.held.append(transport)

    def flush(self) -> None:
        held, self.held = self.held, []
        for transport in held:
            try:
                transport.flush()
            except Exception as exc:
                # One connection's failure must not strand the others' answers.
                self.loop.call_exception_handler(
                    {"message": "writing a connection's held bytes failed", "exception": exc}
                )


_TURNS: WeakKeyDictionary[asyncio.AbstractEventLoop, TurnWrites] = WeakKeyDictionary()


class TurnEndTransport:
    """A connection's transport as its protocol sees it: writes are held until
    the loop's turn ends (see the module's docstring); the rest is the
    transport's own."""

    __slots__ = ("pending", "requests", "transport", "turn")

    def __init__(
        self, transport: asyncio.Transport, turn: TurnWrites, requests: RequestCount
    ) -> None:
        self.transport = transport
        self.turn = turn
        # Counts the request whose answer is being written, until it is written.
        self.requests = requests
        self.pending: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pending = self.pending
        if pending is None:
            if self.requests.count < HOLD_FROM_REQUESTS or len(data) > JOIN_LIMIT_BYTES:
                self.transport.write(data)
                return
            # A caller may reuse its bytearray once write returns.
            self.pending = data if type(data) is bytes else bytes(data)
            self.turn.hold(self)
        elif len(pending) + len(data) <= JOIN_LIMIT_BYTES:
            self.pending = pending + data
        else:
            self.flush()
            self.transport.write(data)

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        self.flush()
        self.transport.writelines(chunks)

    def flush(self) -> None:
        """Send what is held now (the protocol calls it on a half-close:
        uvloop then closes the transport without going through this one)."""
        pending = self.pending
        if pending is not None:
            self.pending = None
            # A connection the peer closed meanwhile: nobody to answer.
            if not self.transport.is_closing():
                self.transport.write(pending)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.pending = None
        self.transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        # The rest of the transport's interface (set_protocol for an upgrade,
        # write-buffer limits): the transport's own.
        return getattr(self.transport, name)
