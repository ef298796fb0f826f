"""API keys fail closed, with a real two-worker Gunicorn and a real nginx with
the njs key check in front: while the keys file is removed, emptied, cut or
rewritten under the readers' feet, no request without a valid key is let
through, by either, and valid keys keep working."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.auth import keyfile
from tests.support.bundles import SETOSA
from tests.support.nginx import NJS_MODULE, Nginx, render, running_nginx
from tests.support.scrape import sample, scrape
from tests.support.servers import Gunicorn, free_port, running_gunicorn, wait_for
from tests.support.traffic import Traffic

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(
        not NJS_MODULE.exists(),
        reason="nginx's njs module: run tests/support/install-system-deps.sh",
    ),
]

WORKERS = 2
# Long enough for every worker to look at the file several times (once a second).
FAULT_SECONDS = 3.0
RACE_SECONDS = 5.0
# What `cp` does to its destination: truncate, then write; this often.
WRITER_PAUSE_SECONDS = 0.007
# Nothing is rate limited here: a refusal must come from the key check.
UNLIMITED = {
    "PROXY_API_KEY_RATE": "100000r/s",
    "PROXY_API_KEY_BURST": "100000",
    "PROXY_UNAUTHENTICATED_RATE": "100000r/s",
    "PROXY_UNAUTHENTICATED_BURST": "100000",
    "PROXY_OPEN_RATE": "100000r/s",
    "PROXY_OPEN_BURST": "100000",
}


@dataclass
class Served:
    server: Gunicorn
    proxy: Nginx
    keys_file: Path
    content: bytes  # the file as the key tool wrote it
    alice: dict[str, str]

    def restore(self) -> None:
        self.keys_file.write_bytes(self.content)

    def proxy_classes(self) -> Counter[str]:
        """How njs classified the requests nginx logged (its access log)."""
        lines = self.proxy.access_log.read_text().splitlines()
        return Counter(json.loads(line).get("key_class", "?") for line in lines if line[:1] == "{")


@pytest.fixture(scope="module")
def served(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("fail-closed")
    keys_file = work / "secrets" / "api-keys"
    alice = keyfile.mint_key()
    keyfile.update(keys_file, add=keyfile.StoredKey("alice", keyfile.digest_of(alice)))
    env = {"API_KEYS_FILE": str(keys_file)}
    model_dir = trained_bundle.parents[1]
    with (
        running_gunicorn(model_dir, work / "logs", workers=WORKERS, env=env) as server,
        running_nginx(work / "nginx", server.port, {**UNLIMITED, **env}) as proxy,
    ):
        yield Served(server, proxy, keys_file, keys_file.read_bytes(), {"X-API-Key": alice})


def _answers_during(
    served: Served, seconds: float, action: Callable[[], None]
) -> dict[str, Traffic]:
    """Keyless and keyed traffic, direct and through the proxy, while `action` runs."""
    traffic = {
        "keyless direct": Traffic(served.server.url, threads=1),
        "keyless via proxy": Traffic(served.proxy.url, threads=1),
        "alice direct": Traffic(served.server.url, threads=1, headers=served.alice),
        "alice via proxy": Traffic(served.proxy.url, threads=1, headers=served.alice),
    }
    for stream in traffic.values():
        stream.__enter__()
    try:
        action()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for stream in traffic.values():
            stream.__exit__(None, None, None)
    return traffic


def _assert_closed(traffic: dict[str, Traffic]) -> None:
    for name in ("keyless direct", "keyless via proxy"):
        stream = traffic[name]
        assert stream.sent > 0, name
        assert (name, len(stream.versions)) == (name, 0), "keyless requests let through"
        assert stream.failure_statuses() == {"401": stream.sent}, name
    for name in ("alice direct", "alice via proxy"):
        stream = traffic[name]
        assert stream.sent > 0, name
        assert (name, stream.failures[:3]) == (name, []), "a valid key was refused"


def _remove(path: Path) -> None:
    path.unlink()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _comments_only(path: Path) -> None:
    path.write_text("# keys are being rotated\n")


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(keyfile.HEADER) + 20])


@pytest.mark.parametrize("fault", [_remove, _empty, _comments_only, _cut], ids=lambda f: f.__name__)
def test_a_broken_keys_file_lets_no_keyless_request_through_and_keeps_valid_keys(
    served: Served, fault: Callable[[Path], None]
) -> None:
    with httpx.Client(timeout=10) as client:
        try:
            traffic = _answers_during(served, FAULT_SECONDS, lambda: fault(served.keys_file))
            _assert_closed(traffic)
            assert client.get(f"{served.server.url}/health").json()["auth"] == "enabled"
            # Every live worker has seen the broken file: the gauge is the minimum.
            wait_for(
                lambda: sample(scrape(client, served.server.url), "api_keys_file_ok") == 0,
                5,
                what="api_keys_file_ok 0",
            )
        finally:
            served.restore()
        wait_for(
            lambda: sample(scrape(client, served.server.url), "api_keys_file_ok") == 1,
            10,
            what="api_keys_file_ok back to 1",
        )
    assert served.proxy_classes()["open"] == 0
    warnings = [
        line for line in served.server.stderr().splitlines() if "API keys file unusable" in line
    ]
    assert warnings
    assert all('"level":"warning"' in line for line in warnings)


def test_a_writer_that_truncates_then_writes_lets_no_keyless_request_through(
    served: Served,
) -> None:
    stop = threading.Event()
    rewrites = 0

    def cp_in_a_loop() -> None:
        nonlocal rewrites
        while not stop.is_set():
            fd = os.open(served.keys_file, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, served.content)
            finally:
                os.close(fd)
            rewrites += 1
            time.sleep(WRITER_PAUSE_SECONDS)

    writer = threading.Thread(target=cp_in_a_loop)
    try:
        traffic = _answers_during(served, RACE_SECONDS, writer.start)
    finally:
        stop.set()
        writer.join()
        served.restore()
    sent = {name: stream.sent for name, stream in traffic.items()}
    let_through = {name: len(traffic[name].versions) for name in traffic if "keyless" in name}
    print(f"\nrewrites {rewrites}; sent {sent}; keyless let through {let_through}")
    assert rewrites > 100
    _assert_closed(traffic)
    # njs classified every request (an exception there would leave it unlimited).
    classes = served.proxy_classes()
    assert set(classes) == {"key:alice", "anonymous"}, classes


def test_the_proxy_names_no_replica_unless_asked(served: Served, tmp_path: Path) -> None:
    answer = httpx.post(f"{served.proxy.url}/predict", json=SETOSA, headers=served.alice)
    assert answer.status_code == 200
    assert "x-upstream-addr" not in answer.headers
    # The access log still says which replica answered.
    assert '"upstream_addr":"127.0.0.1:' in served.proxy.access_log.read_text()
    debug = render(tmp_path, served.server.port, free_port(), {"PROXY_UPSTREAM_ADDR_HEADER": "on"})
    assert "add_header X-Upstream-Addr $upstream_addr always;" in debug.read_text()
