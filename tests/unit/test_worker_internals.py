"""The uvicorn internals service.worker relies on, pinned: a uvicorn upgrade
that renames them fails here, by name, rather than silently in production."""

from __future__ import annotations

import inspect
from types import ModuleType, SimpleNamespace

import pytest
from uvicorn.protocols.http import h11_impl, httptools_impl
from uvicorn.server import Server, ServerState
from uvicorn_worker import UvicornWorker

from service.worker import close_after_answer


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


@pytest.mark.parametrize("module", [httptools_impl, h11_impl])
def test_request_cycles_still_share_the_servers_default_headers_a_drain_extends(
    module: ModuleType,
) -> None:
    # A drain appends `connection: close` to server_state.default_headers in
    # place: each cycle must be handed that list, not a copy, and must close
    # the connection after an answer that carries the header.
    protocol = inspect.getsource(module)
    assert "default_headers=self.server_state.default_headers" in protocol
    assert "self.default_headers + " in inspect.getsource(module.RequestResponseCycle.send)
    assert 'b"connection"' in protocol


def test_server_and_worker_hooks_the_draining_worker_overrides_still_exist() -> None:
    assert "sockets" in inspect.signature(Server.startup).parameters
    assert "connections" in inspect.getsource(ServerState.__init__)
    assert "default_headers" in inspect.getsource(ServerState.__init__)
    assert "force_exit" in inspect.getsource(Server.__init__)
    assert callable(UvicornWorker._serve)


def _connection(*, keep_alive: bool, started: bool, complete: bool) -> SimpleNamespace:
    cycle = SimpleNamespace(
        keep_alive=keep_alive, response_started=started, response_complete=complete
    )
    return SimpleNamespace(cycle=cycle)


def test_only_connections_about_to_answer_are_asked_to_close_and_no_more_than_asked() -> None:
    answering = [_connection(keep_alive=True, started=False, complete=False) for _ in range(5)]
    idle = SimpleNamespace(cycle=None)
    sending = _connection(keep_alive=True, started=True, complete=False)
    done = _connection(keep_alive=True, started=True, complete=True)
    closing = _connection(keep_alive=False, started=False, complete=False)
    connections = [idle, sending, done, closing, *answering]
    assert close_after_answer(connections, 3) == 3
    assert [c.cycle.keep_alive for c in answering] == [False, False, False, True, True]
    assert sending.cycle.keep_alive
    assert done.cycle.keep_alive
    assert close_after_answer(connections, 10) == 2
