"""The set of replicas behind the proxy changes without a reload: a real nginx
with the shipped configuration in front of real Gunicorns, and clients that
keep their connections open.

A reload makes the old nginx workers close every idle client keep-alive
connection, and a client that sends on one at that moment gets no answer: a
rolling update lost 22 of 2,880 keep-alive requests that way. The replicas'
addresses now reach nginx through the file entrypoint.sh writes
(peers/api), read in place by upstreams.lua.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.keepalive_clients import KeepAliveClients, keep_alive_clients
from tests.support.nginx import OPEN_PROXY_SETTINGS, running_nginx, write_peers
from tests.support.servers import Gunicorn, free_port, two_open_gunicorns

pytestmark = pytest.mark.process


@pytest.fixture
def replicas(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    with two_open_gunicorns(model_dir, tmp_path, ("a", "b")) as pair:
        yield pair


@pytest.fixture
def clients(replicas: tuple[Gunicorn, Gunicorn], tmp_path: Path) -> Iterator[KeepAliveClients]:
    a, _ = replicas
    with (
        running_nginx(tmp_path / "nginx", a.port, OPEN_PROXY_SETTINGS) as proxy,
        keep_alive_clients(proxy.port) as load,
    ):
        yield load


def test_replicas_change_under_keep_alive_clients_without_closing_a_connection(
    replicas: tuple[Gunicorn, Gunicorn], clients: KeepAliveClients, tmp_path: Path
) -> None:
    a, b = replicas
    conf_dir = tmp_path / "nginx"
    on_a, on_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"

    clients.wait_until("answers from the first replica", lambda seen: set(seen) == {on_a})
    # Scale up: both answer.
    write_peers(conf_dir, "api", [a.port, b.port])
    clients.wait_until("answers from both", lambda seen: {on_a, on_b} <= set(seen))
    # A rolling update's end: the old replica leaves the set, then drains and exits.
    write_peers(conf_dir, "api", [b.port])
    clients.wait_until("answers from the second alone", lambda seen: set(seen) == {on_b})
    assert a.stop() == 0
    # A stale address (a replica gone before the name stopped resolving to it):
    # the try fails at connect and the request goes on to a live one.
    gone = free_port()
    write_peers(conf_dir, "api", [gone, b.port])
    clients.wait_until(
        "a retry past the gone replica",
        lambda seen: any(addr.startswith(f"127.0.0.1:{gone}, ") for addr in seen),
    )
    clients.stop.set()
    clients.assert_no_connection_lost()
