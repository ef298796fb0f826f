"""The set of replicas behind the proxy changes without a reload: a real nginx
with the shipped configuration in front of real Gunicorns, and clients that
keep their connections open (as requests.Session or any pooled client does).

A reload makes the old nginx workers close every idle client keep-alive
connection, and a client that sends on one at that moment gets no answer: a
rolling update lost 22 of 2,880 keep-alive requests that way. The replicas'
addresses now reach nginx through the file entrypoint.sh writes
(peers/api), read in place by upstreams.lua.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.bundles import SETOSA
from tests.support.nginx import Nginx, running_nginx, write_peers
from tests.support.servers import Gunicorn, free_port, running_gunicorn, wait_for

pytestmark = pytest.mark.process

SETTINGS = {
    "AUTH": "off",
    "PROXY_OPEN_RATE": "10000r/s",
    "PROXY_OPEN_BURST": "10000",
    "PROXY_UPSTREAM_ADDR_HEADER": "on",
}
CLIENTS = 4


@dataclass
class KeepAliveClients:
    """CLIENTS threads, each POSTing on one connection it never reopens."""

    proxy: Nginx
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: list[tuple[int, str]] = field(default_factory=list)  # (status, X-Upstream-Addr)
    failures: list[str] = field(default_factory=list)
    local_ports: list[set[int]] = field(default_factory=list)
    announced_closes: list[int] = field(default_factory=list)

    def run(self, index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
        body = json.dumps(SETOSA)
        try:
            while not self.stop.is_set():
                try:
                    connection.request(
                        "POST", "/predict", body, {"Content-Type": "application/json"}
                    )
                    assert connection.sock is not None
                    port = connection.sock.getsockname()[1]
                    response = connection.getresponse()
                    response.read()
                except Exception as exc:
                    with self.lock:
                        self.failures.append(repr(exc))
                    return
                with self.lock:
                    self.local_ports[index].add(port)
                    # nginx ends a connection after keepalive_requests, saying
                    # so in the answer; the client then opens another.
                    self.announced_closes[index] += response.will_close
                    self.answers.append(
                        (response.status, response.getheader("X-Upstream-Addr", ""))
                    )
                # Idle between requests, as a client at tens of requests a
                # second is: the moment a reload would close the connection.
                self.stop.wait(0.01)
        finally:
            connection.close()

    def answered_since(self, start: int) -> list[str]:
        with self.lock:
            return [host for _, host in self.answers[start:]]

    def wait_until(self, what: str, condition: Callable[[list[str]], bool]) -> None:
        """Wait until the answers from now on (at least 50) satisfy `condition`."""
        with self.lock:
            start = len(self.answers)

        def met() -> bool:
            assert not self.failures, self.failures
            answered = self.answered_since(start)
            return len(answered) >= 50 and condition(answered[-50:])

        wait_for(met, 30, what=what)


@pytest.fixture
def replicas(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    env = {"AUTH": "off"}
    with (
        running_gunicorn(model_dir, tmp_path / "a", workers=1, env=env) as a,
        running_gunicorn(model_dir, tmp_path / "b", workers=1, env=env) as b,
    ):
        yield a, b


@pytest.fixture
def clients(replicas: tuple[Gunicorn, Gunicorn], tmp_path: Path) -> Iterator[KeepAliveClients]:
    a, _ = replicas
    with running_nginx(tmp_path / "nginx", a.port, SETTINGS) as proxy:
        load = KeepAliveClients(
            proxy, local_ports=[set() for _ in range(CLIENTS)], announced_closes=[0] * CLIENTS
        )
        threads = [threading.Thread(target=load.run, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            yield load
        finally:
            load.stop.set()
            for thread in threads:
                thread.join(timeout=30)


def test_replicas_change_under_keep_alive_clients_without_closing_a_connection(
    replicas: tuple[Gunicorn, Gunicorn], clients: KeepAliveClients, tmp_path: Path
) -> None:
    a, b = replicas
    peers_dir = tmp_path / "nginx"
    on_a, on_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"

    clients.wait_until("answers from the first replica", lambda seen: set(seen) == {on_a})
    # Scale up: both answer.
    write_peers(peers_dir, "api", [a.port, b.port])
    clients.wait_until("answers from both", lambda seen: {on_a, on_b} <= set(seen))
    # A rolling update's end: the old replica leaves the set, then drains and exits.
    write_peers(peers_dir, "api", [b.port])
    clients.wait_until("answers from the second alone", lambda seen: set(seen) == {on_b})
    assert a.stop() == 0
    # A stale address (a replica gone before the name stopped resolving to it):
    # the try fails at connect and the request goes on to a live one.
    gone = free_port()
    write_peers(peers_dir, "api", [gone, b.port])
    clients.wait_until(
        "a retry past the gone replica",
        lambda seen: any(addr.startswith(f"127.0.0.1:{gone}, ") for addr in seen),
    )
    clients.stop.set()

    assert not clients.failures, clients.failures
    assert {status for status, _ in clients.answers} == {200}
    # No connection ended but those nginx announced (Connection: close).
    opened = [len(ports) for ports in clients.local_ports]
    assert opened == [1 + closes for closes in clients.announced_closes], opened
