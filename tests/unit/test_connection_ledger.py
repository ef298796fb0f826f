"""The shared ledger the workers balance their connections with."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.server import acceptor
from service.server.acceptor import ConnectionLedger, clear_slot, create_ledger


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "conns"
    create_ledger(path)
    return path


@pytest.fixture
def open_ledger(ledger_path: Path) -> Iterator[Callable[[], ConnectionLedger]]:
    """This process's ledgers, each closed after the test (a worker closes its own at exit)."""
    opened: list[ConnectionLedger] = []

    def ledger() -> ConnectionLedger:
        opened.append(ConnectionLedger(ledger_path))
        return opened[-1]

    yield ledger
    for each in opened:
        each.close()


def _sibling(path: Path, held: int) -> int:
    """A ledger entry from another live process; returns its pid."""
    code = (
        "import sys; from pathlib import Path;"
        "from service.server.acceptor import ConnectionLedger;"
        f"ConnectionLedger(Path({str(path)!r})).publish({held}); print(__import__('os').getpid())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_a_lone_worker_has_no_sibling_to_defer_to(
    open_ledger: Callable[[], ConnectionLedger],
) -> None:
    ledger = open_ledger()
    ledger.publish(7)
    assert ledger.least_loaded_sibling() is None


def test_siblings_report_the_least_loaded_count(
    ledger_path: Path, open_ledger: Callable[[], ConnectionLedger]
) -> None:
    _sibling(ledger_path, 5)
    _sibling(ledger_path, 3)
    mine = open_ledger()
    mine.publish(9)
    assert mine.least_loaded_sibling() == 3


def test_a_dead_workers_slot_is_cleared_by_the_master(
    ledger_path: Path, open_ledger: Callable[[], ConnectionLedger]
) -> None:
    dead = _sibling(ledger_path, 0)
    mine = open_ledger()
    assert mine.least_loaded_sibling() == 0
    clear_slot(ledger_path, dead)
    assert mine.least_loaded_sibling() is None


def test_a_stale_slot_is_ignored_and_reclaimed(
    ledger_path: Path, open_ledger: Callable[[], ConnectionLedger], monkeypatch: pytest.MonkeyPatch
) -> None:
    _sibling(ledger_path, 0)
    later = acceptor._now_ms() + acceptor.STALE_MS + 1
    monkeypatch.setattr(acceptor, "_now_ms", lambda: later)
    mine = open_ledger()
    assert mine.least_loaded_sibling() is None
    # The stale slot was the first one, and it was reused.
    assert mine._offset == 0


def test_a_closed_ledger_frees_its_slot(ledger_path: Path) -> None:
    first = ConnectionLedger(ledger_path)
    first.close()
    second = ConnectionLedger(ledger_path)
    second.close()
    assert second._offset == 0


class _Ledger:
    def __init__(self, least: int | None) -> None:
        self.least = least

    def least_loaded_sibling(self) -> int | None:
        return self.least


def test_a_worker_far_ahead_of_a_sibling_sheds_half_the_lead_and_then_waits() -> None:
    asked: list[int] = []

    def shed(count: int) -> int:
        asked.append(count)
        return count

    ledger = _Ledger(least=0)
    load = acceptor.WorkerLoad(ledger, connections=[object()] * 32, shed=shed)  # type: ignore[arg-type]
    assert load.rebalance() == 16
    # The ledger shows the effect a heartbeat or more later: no second shed yet.
    assert load.rebalance() == 0
    assert asked == [16]


@pytest.mark.parametrize("least", [None, 29, 32, 40])
def test_a_worker_near_or_below_its_siblings_keeps_its_connections(least: int | None) -> None:
    load = acceptor.WorkerLoad(
        _Ledger(least),  # type: ignore[arg-type]
        connections=[object()] * 32,
        shed=lambda count: pytest.fail(f"asked to shed {count}"),
    )
    assert load.rebalance() == 0
