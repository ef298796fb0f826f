"""The worker's connections hold their writes until the event loop's turn ends,
in order, and nothing a connection does afterwards can overtake or lose them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest
import uvloop

from service.server.turn_writes import (
    HOLD_FROM_REQUESTS,
    JOIN_LIMIT_BYTES,
    TurnEndTransport,
    TurnWrites,
)


class RecordingTransport:
    """A transport that records what reaches it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.calls.append(("write", bytes(data)))

    def writelines(self, chunks: Any) -> None:
        self.calls.append(("writelines", b"".join(chunks)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", None))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7


def _in_a_turn(body: Callable[[TurnWrites], None]) -> None:
    """Runs `body` inside one callback of a fresh uvloop loop, then lets the turn end."""

    async def main() -> None:
        turn = TurnWrites.of(asyncio.get_running_loop())
        body(turn)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


@dataclass
class Requests:
    """The worker's requests in progress, the one being answered included."""

    count: int = HOLD_FROM_REQUESTS


def _wrap(
    real: RecordingTransport, turn: TurnWrites, requests: Requests | None = None
) -> TurnEndTransport:
    """`real` as a connection of a worker with other requests in progress, by default."""
    return TurnEndTransport(cast(asyncio.Transport, real), turn, requests or Requests())


def _held(turn: TurnWrites) -> tuple[RecordingTransport, TurnEndTransport]:
    real = RecordingTransport()
    return real, _wrap(real, turn)


def test_answers_of_one_turn_leave_when_it_ends_one_write_a_connection() -> None:
    seen_during_turn: list[list[tuple[str, Any]]] = []
    reals: list[RecordingTransport] = []

    def turn_of_three(turn: TurnWrites) -> None:
        for n in range(3):
            real, held = _held(turn)
            reals.append(real)
            held.write(b"head %d|" % n)
            held.write(bytearray(b"body %d" % n))
        seen_during_turn.extend(list(real.calls) for real in reals)

    _in_a_turn(turn_of_three)
    assert seen_during_turn == [[], [], []]
    assert [real.calls for real in reals] == [
        [("write", b"head %d|body %d" % (n, n))] for n in range(3)
    ]


@pytest.mark.parametrize(
    ("ending", "reaching_the_transport"),
    [
        # Closing sends what was held first, and only once.
        ("close", [("write", b"answer"), ("close", None)]),
        # Aborting sends nothing that was held.
        ("abort", [("abort", None)]),
    ],
)
def test_a_connection_ended_in_its_turn_settles_what_it_held_then(
    ending: str, reaching_the_transport: list[tuple[str, Any]]
) -> None:
    real = RecordingTransport()

    def answer_then_end(turn: TurnWrites) -> None:
        held = _wrap(real, turn)
        held.write(b"answer")
        getattr(held, ending)()

    _in_a_turn(answer_then_end)
    assert real.calls == reaching_the_transport


def test_a_connection_closed_by_its_peer_drops_what_it_held() -> None:
    real = RecordingTransport()

    def peer_gone(turn: TurnWrites) -> None:
        held = _wrap(real, turn)
        held.write(b"answer")
        real.closing = True  # connection_lost, before the turn ends

    _in_a_turn(peer_gone)
    assert real.calls == []


def test_large_writes_go_at_once_after_what_was_held() -> None:
    real = RecordingTransport()
    large = b"x" * (JOIN_LIMIT_BYTES + 1)

    def small_then_large(turn: TurnWrites) -> None:
        held = _wrap(real, turn)
        held.write(b"small")
        held.write(large)
        held.write(large)
        held.writelines([b"a", b"b"])

    _in_a_turn(small_then_large)
    assert real.calls == [
        ("write", b"small"),
        ("write", large),
        ("write", large),
        ("writelines", b"ab"),
    ]


def test_held_bytes_never_grow_past_the_limit() -> None:
    real = RecordingTransport()
    half = b"y" * (JOIN_LIMIT_BYTES // 2 + 1)

    def three_halves(turn: TurnWrites) -> None:
        held = _wrap(real, turn)
        for _ in range(3):
            held.write(half)

    _in_a_turn(three_halves)
    assert [data for _, data in real.calls] == [half, half, half]


def test_the_rest_of_the_transport_is_its_own() -> None:
    real = RecordingTransport()

    def ask(turn: TurnWrites) -> None:
        held = _wrap(real, turn)
        assert held.get_write_buffer_size() == 7
        assert not held.is_closing()

    _in_a_turn(ask)


def test_each_loop_has_its_own_turn() -> None:
    # A loop closed with bytes still held must not leave the next loop's
    # connections waiting for a flush it never schedules.
    first = RecordingTransport()
    loop = uvloop.new_event_loop()
    _wrap(first, TurnWrites.of(loop)).write(b"left")
    loop.close()  # its turn never ended
    second = RecordingTransport()
    _in_a_turn(lambda turn: _wrap(second, turn).write(b"ok"))
    assert first.calls == []
    assert second.calls == [("write", b"ok")]


class FailingTransport(RecordingTransport):
    def write(self, data: bytes) -> None:
        raise RuntimeError("Cannot call write() after write_eof()")


def test_a_connection_failing_its_write_does_not_strand_the_turns_others() -> None:
    healthy = RecordingTransport()
    failures: list[BaseException] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: failures.append(context["exception"]))
        turn = TurnWrites.of(loop)
        _wrap(FailingTransport(), turn).write(b"lost")
        held = _wrap(healthy, turn)
        held.write(b"answer 1")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        # The next answer on the healthy connection has a turn end of its own.
        held.write(b"answer 2")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert [type(failure) for failure in failures] == [RuntimeError]
    assert healthy.calls == [("write", b"answer 1"), ("write", b"answer 2")]


def test_a_lone_requests_answer_leaves_at_once_and_later_ones_keep_their_order() -> None:
    real = RecordingTransport()
    requests = Requests(count=HOLD_FROM_REQUESTS - 1)
    written_at_once: list[list[tuple[str, Any]]] = []

    def lone_then_busy(turn: TurnWrites) -> None:
        held = _wrap(real, turn, requests)
        held.write(b"lone")
        written_at_once.append(list(real.calls))
        requests.count = HOLD_FROM_REQUESTS
        held.write(b"busy ")
        # Held bytes go first, whoever writes next.
        requests.count = HOLD_FROM_REQUESTS - 1
        held.write(b"lone again")

    _in_a_turn(lone_then_busy)
    assert written_at_once == [[("write", b"lone")]]
    assert real.calls == [("write", b"lone"), ("write", b"busy lone again")]
