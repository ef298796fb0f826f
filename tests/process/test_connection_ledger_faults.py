"""A hostile or broken connection ledger cannot hurt the server: with a real
two-worker Gunicorn, the ledger file removed, cut short, filled by a foreign
process or given a fake sibling with a bogus count, every worker keeps
answering (replacement workers included) and no request fails."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.server import acceptor
from tests.support.bundles import SETOSA
from tests.support.servers import Gunicorn, running_gunicorn, wait_for
from tests.support.traffic import Traffic

pytestmark = pytest.mark.process

WORKERS = 2
# Workers recycle every this many requests, so replacement workers boot
# (and open the ledger) while the fault is in place.
RECYCLE_EVERY = 40
REPLACEMENTS = 2
FAULT_SECONDS = 3.0
KEEPALIVE_CLIENTS = 8


@pytest.fixture
def server(model_dir: Path, tmp_path: Path) -> Iterator[Gunicorn]:
    env = {"MAX_REQUESTS": str(RECYCLE_EVERY), "MAX_REQUESTS_JITTER": "0"}
    with running_gunicorn(model_dir, tmp_path / "logs", workers=WORKERS, env=env) as running:
        yield running


def _ledger(server: Gunicorn) -> Path:
    found = re.search(r"connection ledger (\S+)", server.stderr())
    assert found, "the master names its ledger at start"
    return Path(found.group(1))


def _write_slot(ledger: Path, slot: int, pid: int, held: int) -> None:
    # A heartbeat a minute ahead: fresh for as long as the test runs.
    fd = os.open(ledger, os.O_WRONLY)
    try:
        os.pwrite(
            fd,
            acceptor._SLOT.pack(pid, held, acceptor._now_ms() + 60_000),
            slot * acceptor._SLOT.size,
        )
    finally:
        os.close(fd)


def _workers_seen(server: Gunicorn) -> set[int]:
    return {line["worker_pid"] for line in server.access_log()}


def _traffic_until_replaced(server: Gunicorn) -> Traffic:
    """Traffic until REPLACEMENTS workers beyond the first ones have answered."""
    with Traffic(server.url, threads=2) as traffic:
        wait_for(
            lambda: len(_workers_seen(server)) >= WORKERS + REPLACEMENTS or traffic.failures,
            90,
            interval=0.2,
            what=f"{REPLACEMENTS} replacement workers to answer",
        )
    return traffic


def _traffic_for(server: Gunicorn, seconds: float) -> Traffic:
    with Traffic(server.url, threads=2) as traffic:
        time.sleep(seconds)
    return traffic


def _unusable_lines(server: Gunicorn) -> list[str]:
    return [line for line in server.stderr().splitlines() if "connection ledger unusable" in line]


def test_a_removed_ledger_leaves_replacement_workers_serving(server: Gunicorn) -> None:
    _ledger(server).unlink()
    traffic = _traffic_until_replaced(server)
    print(f"\nremoved: sent {traffic.sent}, failed {len(traffic.failures)}")
    assert traffic.failures == []
    assert len(_workers_seen(server)) >= WORKERS + REPLACEMENTS
    assert all("FileNotFoundError" in line for line in _unusable_lines(server))
    assert len(_unusable_lines(server)) >= REPLACEMENTS


def test_a_ledger_cut_short_leaves_the_workers_serving(server: Gunicorn) -> None:
    workers = server.worker_pids()
    os.truncate(_ledger(server), 0)
    traffic = _traffic_for(server, FAULT_SECONDS)
    print(f"\ntruncated: sent {traffic.sent}, failed {len(traffic.failures)}")
    assert traffic.failures == []
    assert traffic.sent > 0
    # Nothing crashed: the only new workers are recycles, and each worker says so once.
    lines = _unusable_lines(server)
    assert lines
    assert all("cut short" in line for line in lines)
    pids = [re.search(r'"worker_pid":(\d+)', line).group(1) for line in lines]  # type: ignore[union-attr]
    assert len(pids) == len(set(pids))
    assert "SIGBUS" not in server.stderr()
    assert workers  # both were there before the fault


def test_slots_filled_by_a_foreign_process_leave_replacement_workers_serving(
    server: Gunicorn,
) -> None:
    ledger = _ledger(server)
    stop = threading.Event()

    def fill() -> None:
        # This test's own pid: a live process, but no worker of this server.
        while not stop.is_set():
            for slot in range(acceptor.SLOTS):
                _write_slot(ledger, slot, os.getpid(), 0)
            time.sleep(0.02)

    filler = threading.Thread(target=fill)
    filler.start()
    try:
        traffic = _traffic_until_replaced(server)
    finally:
        stop.set()
        filler.join()
    print(f"\nfilled: sent {traffic.sent}, failed {len(traffic.failures)}")
    assert traffic.failures == []
    assert "connection ledger full" not in server.stderr()


@pytest.mark.parametrize(
    "fake",
    [
        lambda server: (os.getpid(), 0),  # not a child of this master
        lambda server: (min(server.worker_pids()), -1000),  # a worker's pid, a bogus count
    ],
    ids=["foreign pid", "bogus count"],
)
def test_a_fake_sibling_slot_is_ignored(
    model_dir: Path, tmp_path: Path, fake: Callable[[Gunicorn], tuple[int, int]]
) -> None:
    """Workers that believed a sibling held nothing would ask their keep-alive
    clients to reconnect (Connection: close) every half second. Once the real
    balancing has settled the clients' connections (on a loaded machine it
    may take it a few rounds), the fake slot arrives: not one close after."""
    with running_gunicorn(model_dir, tmp_path / "logs", workers=WORKERS) as server:
        answers: list[tuple[float, int, bool]] = []  # when, status, Connection: close
        lock = threading.Lock()
        stop = threading.Event()

        def keepalive_client() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    response = client.post(f"{server.url}/predict", json=SETOSA)
                    closed = response.headers.get("connection") == "close"
                    with lock:
                        answers.append((time.monotonic(), response.status_code, closed))

        def settled() -> bool:
            # No close for two rebalance periods: the balancing has nothing left to do.
            quiet_since = time.monotonic() - 2 * acceptor.REBALANCE_EVERY_SECONDS
            with lock:
                return len(answers) > 0 and not any(
                    closed for when, _, closed in answers if when >= quiet_since
                )

        clients = [threading.Thread(target=keepalive_client) for _ in range(KEEPALIVE_CLIENTS)]
        for client in clients:
            client.start()
        try:
            time.sleep(2 * acceptor.REBALANCE_EVERY_SECONDS)
            wait_for(settled, 20, interval=0.1, what="the connections balanced")
            pid, held = fake(server)
            _write_slot(_ledger(server), acceptor.SLOTS - 1, pid, held)
            faked_at = time.monotonic()
            time.sleep(FAULT_SECONDS)
        finally:
            stop.set()
            for client in clients:
                client.join()
    during = [(status, closed) for when, status, closed in answers if when > faked_at]
    print(f"\nfake sibling: {len(during)} answers, {sum(c for _, c in during)} closes")
    assert {status for _, status, _ in answers} == {200}
    assert len(during) > 0
    assert not any(closed for _, closed in during)
