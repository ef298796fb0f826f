"""The shared ledger the workers balance their connections with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service import acceptor
from service.acceptor import ConnectionLedger, clear_slot, create_ledger


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "conns"
    create_ledger(path)
    return path


def _sibling(path: Path, held: int) -> int:
    """A ledger entry from another live process; returns its pid."""
    code = (
        "import sys; from pathlib import Path; from service.acceptor import ConnectionLedger;"
        f"ConnectionLedger(Path({str(path)!r})).publish({held}); print(__import__('os').getpid())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_a_lone_worker_has_no_sibling_to_defer_to(ledger_path: Path) -> None:
    ledger = ConnectionLedger(ledger_path)
    ledger.publish(7)
    assert ledger.least_loaded_sibling() is None


def test_siblings_report_the_least_loaded_count(ledger_path: Path) -> None:
    _sibling(ledger_path, 5)
    _sibling(ledger_path, 3)
    mine = ConnectionLedger(ledger_path)
    mine.publish(9)
    assert mine.least_loaded_sibling() == 3


def test_a_dead_workers_slot_is_cleared_by_the_master(ledger_path: Path) -> None:
    dead = _sibling(ledger_path, 0)
    mine = ConnectionLedger(ledger_path)
    assert mine.least_loaded_sibling() == 0
    clear_slot(ledger_path, dead)
    assert mine.least_loaded_sibling() is None


def test_a_stale_slot_is_ignored_and_reclaimed(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sibling(ledger_path, 0)
    later = acceptor._now_ms() + acceptor.STALE_MS + 1
    monkeypatch.setattr(acceptor, "_now_ms", lambda: later)
    mine = ConnectionLedger(ledger_path)
    assert mine.least_loaded_sibling() is None
    # The stale slot was the first one, and it was reused.
    assert mine._offset == 0


def test_a_closed_ledger_frees_its_slot(ledger_path: Path) -> None:
    first = ConnectionLedger(ledger_path)
    first.close()
    second = ConnectionLedger(ledger_path)
    assert second._offset == 0
