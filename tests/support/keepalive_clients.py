"""Clients that keep their connections open through a proxy (as
requests.Session or any pooled client does), POSTing predictions with a short
idle gap, and noticing every connection that ended without notice.

A reload of nginx closes idle client keep-alive connections; a client that
sends on one at that moment gets no answer (BrokenPipe, reset, or
RemoteDisconnected), and clients do not retry a POST.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.support.bundles import SETOSA
from tests.support.servers import wait_for


@dataclass
class KeepAliveClients:
    port: int
    clients: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: list[tuple[int, str]] = field(default_factory=list)  # (status, X-Upstream-Addr)
    failures: list[str] = field(default_factory=list)
    local_ports: list[set[int]] = field(default_factory=list)
    announced_closes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.local_ports = [set() for _ in range(self.clients)]
        self.announced_closes = [0] * self.clients

    def run(self, index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        body = json.dumps(SETOSA)
        headers = {"Content-Type": "application/json"}
        try:
            while not self.stop.is_set():
                try:
                    connection.request("POST", "/predict", body, headers)
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
                    upstream = response.getheader("X-Upstream-Addr", "")
                    self.answers.append((response.status, upstream))
                # Idle between requests, as a client at tens of requests a
                # second is: the moment a reload would close the connection.
                self.stop.wait(0.01)
        finally:
            connection.close()

    def wait_until(self, what: str, condition: Callable[[list[str]], bool]) -> None:
        """Wait until the last 50 answers from now on satisfy `condition`
        (given their X-Upstream-Addr values)."""
        with self.lock:
            start = len(self.answers)

        def met() -> bool:
            assert not self.failures, self.failures
            with self.lock:
                answered = [addr for _, addr in self.answers[start:]]
            return len(answered) >= 50 and condition(answered[-50:])

        wait_for(met, 30, what=what)

    def assert_no_connection_lost(self) -> None:
        """Every request answered 200, and no connection ended but those nginx
        announced (Connection: close)."""
        assert not self.failures, self.failures
        assert self.answers
        assert {status for status, _ in self.answers} == {200}
        opened = [len(ports) for ports in self.local_ports]
        assert opened == [1 + closes for closes in self.announced_closes], opened


@contextmanager
def keep_alive_clients(port: int, clients: int = 4) -> Iterator[KeepAliveClients]:
    load = KeepAliveClients(port, clients)
    threads = [threading.Thread(target=load.run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=30)
