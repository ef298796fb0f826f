"""The uvicorn internals service.server.worker relies on, pinned: a uvicorn upgrade
that renames them fails here, by name, rather than silently in production."""

from __future__ import annotations

import hashlib
import inspect
import re
from types import ModuleType, SimpleNamespace

import pytest
from uvicorn.protocols.http import h11_impl, httptools_impl
from uvicorn.server import Server, ServerState
from uvicorn_worker import UvicornWorker

from service.server.worker import (
    ACCEPTED_REQUEST_GRACE_SECONDS,
    HeldHead,
    close_after_answer,
    drain_seconds,
)


@pytest.mark.parametrize("module", [httptools_impl, h11_impl])
def test_request_cycles_still_have_the_flags_a_rebalance_sets(module: ModuleType) -> None:
    cycle_init = inspect.getsource(module.RequestResponseCycle.__init__)
    for attribute in ("self.keep_alive", "self.response_started", "self.response_complete"):
        assert attribute in cycle_init, f"{module.__name__}: {attribute} is gone"
    protocol = inspect.getsource(module)
    # The protocol keeps its current cycle as .cycle, and closes the
    # connection after a response whose cycle says not to keep it alive.
    assert "self.cycle = RequestResponseCycle(" in protocol
    assert "not self.keep_alive" in protocol


@pytest.mark.parametrize(
    ("module", "closes_after_the_header"),
    [(httptools_impl, 'if b"close" in connection'), (h11_impl, "our_state is h11.MUST_CLOSE")],
)
def test_request_cycles_still_take_the_default_headers_a_drain_extends(
    module: ModuleType, closes_after_the_header: str
) -> None:
    # A drain appends `connection: close` to server_state.default_headers and
    # points waiting cycles at that list: a cycle must be handed the list itself
    # (not a copy), send it with its answer, and close after such an answer.
    assert "default_headers=self.server_state.default_headers" in inspect.getsource(module)
    assert "self.default_headers = default_headers" in inspect.getsource(
        module.RequestResponseCycle.__init__
    )
    send = inspect.getsource(module.RequestResponseCycle.send)
    assert "self.default_headers + " in send
    assert closes_after_the_header in inspect.getsource(module)


def test_the_httptools_cycle_still_writes_only_through_what_a_held_head_offers() -> None:
    # WholeResponseProtocol makes each cycle a WholeResponseCycle (uvicorn's,
    # subclassed) with a HeldHead for a transport: the cycle must be a plain
    # class, created in on_headers_complete as self.cycle, and use no other
    # transport method.
    cycle_class = httptools_impl.RequestResponseCycle
    assert "__slots__" not in vars(cycle_class)
    assert "self.cycle = RequestResponseCycle(" in inspect.getsource(
        httptools_impl.HttpToolsProtocol.on_headers_complete
    )
    used = set(re.findall(r"self\.transport\.(\w+)", inspect.getsource(cycle_class)))
    assert used <= {name for name in dir(HeldHead) if not name.startswith("_")}
    # Every request cycle's task is made by _start_asgi_task; a pipelined one
    # waits in self.pipeline until then, and never starts once the connection
    # is lost.
    protocol = httptools_impl.HttpToolsProtocol
    assert "self._start_asgi_task(self.cycle, app)" in inspect.getsource(
        protocol.on_headers_complete
    )
    assert "self.pipeline.appendleft((self.cycle, app))" in inspect.getsource(
        protocol.on_headers_complete
    )
    on_response = inspect.getsource(protocol.on_response_complete)
    assert on_response.index("is_closing()") < on_response.index("self._start_asgi_task(")
    assert "cycle.run_asgi(app)" in inspect.getsource(protocol._start_asgi_task)
    # The head is written once, on http.response.start, the body after it.
    send = inspect.getsource(cycle_class.send)
    assert send.count('self.transport.write(b"".join(content))') == 2
    assert send.index("self.response_started = True") < send.index("self.transport.write(")


def test_the_httptools_send_still_builds_the_head_the_worker_builds_itself() -> None:
    # WholeResponseCycle writes the usual head itself, as uvicorn's send would:
    # the same checks, lowercase names, and the framing headers it adds.
    # tests/unit/test_whole_responses.py compares the bytes; this names what moved.
    send = inspect.getsource(httptools_impl.RequestResponseCycle.send)
    for line in (
        "if HEADER_RE.search(name):",
        "if HEADER_VALUE_RE.search(value):",
        "name = name.lower()",
        "self.expected_content_length = int(value.decode())",
        'content.append(b"connection: close\\r\\n")',
        'content.append(b"transfer-encoding: chunked\\r\\n")',
        "self.message_event.set()",
        "self.on_response()",
    ):
        assert line in send, line


@pytest.mark.parametrize(
    ("keepalive", "graceful_timeout", "expected"),
    [(5, 30, 5), (75, 30, 15), (0, 30, ACCEPTED_REQUEST_GRACE_SECONDS), (5, 4, 2)],
)
def test_a_drain_waits_for_keep_alive_but_leaves_half_the_graceful_timeout(
    keepalive: float, graceful_timeout: float, expected: float
) -> None:
    assert drain_seconds(keepalive, graceful_timeout) == expected


def test_server_and_worker_hooks_the_draining_worker_overrides_still_exist() -> None:
    assert "sockets" in inspect.signature(Server.startup).parameters
    assert "connections" in inspect.getsource(ServerState.__init__)
    assert "default_headers" in inspect.getsource(ServerState.__init__)
    assert "force_exit" in inspect.getsource(Server.__init__)
    assert "callback_notify" in inspect.getsource(UvicornWorker.__init__)
    assert callable(UvicornWorker._serve)


def _connection(*, keep_alive: bool, started: bool, complete: bool) -> SimpleNamespace:
    cycle = SimpleNamespace(
        keep_alive=keep_alive, response_started=started, response_complete=complete
    )
    return SimpleNamespace(cycle=cycle)


def test_only_connections_about_to_answer_are_asked_to_close_and_no_more_than_asked() -> None:
    answering = [_connection(keep_alive=True, started=False, complete=False) for _ in range(5)]
    idle = SimpleNamespace(cycle=None)  # not this worker's protocol: left alone
    sending = _connection(keep_alive=True, started=True, complete=False)
    done = _connection(keep_alive=True, started=True, complete=True)
    closing = _connection(keep_alive=False, started=False, complete=False)
    connections = [idle, sending, done, closing, *answering]
    assert close_after_answer(connections, 3) == 3
    assert [c.cycle.keep_alive for c in answering] == [False, False, False, True, True]
    assert sending.cycle.keep_alive
    assert done.cycle.keep_alive
    assert close_after_answer(connections, 10) == 2


def test_an_idle_connection_is_asked_to_close_after_its_next_answer() -> None:
    """Inline answers take one event-loop turn, so a rebalance almost never finds
    a connection mid-answer: idle connections of the worker's protocol are
    flagged instead, and their next request is answered with Connection: close."""
    from service.server.worker import WholeResponseProtocol

    idle = [SimpleNamespace(cycle=None, close_after_next_answer=False) for _ in range(3)]
    finished = _connection(keep_alive=True, started=True, complete=True)
    finished.close_after_next_answer = False
    assert close_after_answer([*idle, finished], 2) == 2
    assert [c.close_after_next_answer for c in idle] == [True, True, False]
    assert close_after_answer([*idle, finished], 5) == 2
    assert finished.close_after_next_answer
    assert WholeResponseProtocol.close_after_next_answer is False


def test_the_protocol_hooks_the_connection_limits_extend_still_exist() -> None:
    # WholeResponseProtocol arms and clears its deadlines in these callbacks,
    # answers refusals with uvicorn's status lines, and DrainingServer sweeps
    # the deadlines from uvicorn's 0.1 s main-loop tick.
    protocol = httptools_impl.HttpToolsProtocol
    for hook in (
        "connection_made",
        "data_received",
        "on_headers_complete",
        "on_message_complete",
        "on_response_complete",
        "connection_lost",
        "_start_asgi_task",
    ):
        assert callable(getattr(protocol, hook)), hook
    assert "self.parser.feed_data(data)" in inspect.getsource(protocol.data_received)
    assert "self.loop = " in inspect.getsource(protocol.__init__)
    assert httptools_impl.STATUS_LINE[431].startswith(b"HTTP/1.1 431 ")
    assert "counter" in inspect.signature(Server.on_tick).parameters
    assert "await asyncio.sleep(0.1)" in inspect.getsource(Server.main_loop)
    assert "self.on_tick(counter)" in inspect.getsource(Server.main_loop)


# uvicorn's methods service.server.worker carries a copy of, changed only as
# its comments say (one method a request instead of two, the keep-alive timer
# armed once per period): the digest of the source they were copied from.
COPIED_FROM_UVICORN = {
    "HttpToolsProtocol.data_received": "010a7ae59a5d3b1a",
    "HttpToolsProtocol.on_headers_complete": "1ea8589acfad92d8",
    "HttpToolsProtocol.on_message_complete": "1fbad42dc31fc01f",
    "HttpToolsProtocol.on_response_complete": "64e254f28e389e76",
    "HttpToolsProtocol._start_asgi_task": "9c08c2571ae9b038",
    "RequestResponseCycle.run_asgi": "0f33f2449a444bc2",
}


@pytest.mark.parametrize("qualified_name", sorted(COPIED_FROM_UVICORN))
def test_the_uvicorn_methods_the_worker_copies_are_still_the_ones_copied(
    qualified_name: str,
) -> None:
    class_name, method = qualified_name.split(".")
    source = inspect.getsource(getattr(getattr(httptools_impl, class_name), method))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == COPIED_FROM_UVICORN[qualified_name], (
        f"uvicorn's {qualified_name} changed: compare it with the copy in "
        "service/server/worker.py, carry the change over, then record the new digest"
    )


def test_uvicorn_arms_its_keep_alive_timer_only_in_the_method_the_worker_replaces() -> None:
    # The worker's own timer stands in for uvicorn's: if uvicorn armed one
    # anywhere else, connections would be closed by both.
    protocol = httptools_impl.HttpToolsProtocol
    armed_in = [
        name
        for name, member in vars(protocol).items()
        if callable(member)
        and "timeout_keep_alive_task = self.loop.call_later" in inspect.getsource(member)
    ]
    assert armed_in == ["on_response_complete"]
    assert "self.timeout_keep_alive_handler" in inspect.getsource(protocol.on_response_complete)


def test_uvicorn_leaves_a_half_closed_connection_to_uvloop_which_closes_it() -> None:
    # The worker's eof_received sends the held answer first, then returns None
    # as uvicorn's does: uvloop then closes the transport. Were uvicorn to
    # start handling a half-close itself, the override would need to follow.
    source = inspect.getsource(httptools_impl.HttpToolsProtocol.eof_received)
    assert source.split(":", 1)[1].strip() == "pass"
