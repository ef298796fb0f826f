"""The shared ledger the workers balance their connections with."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.server import acceptor
from service.server.acceptor import ConnectionLedger, clear_slot, create_ledger


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return create_ledger(tmp_path)


def _mine(path: Path) -> ConnectionLedger:
    """A ledger whose siblings are this test's subprocesses (this process is their master)."""
    return ConnectionLedger(path, master=os.getpid())


Sibling = Callable[[int], int]


@pytest.fixture
def sibling(ledger_path: Path) -> Iterator[Sibling]:
    """Starts a process that publishes a count in the ledger and stays alive
    until the test ends (a slot counts only while its worker lives); returns its pid."""
    started: list[subprocess.Popen[str]] = []

    def start(held: int) -> int:
        code = (
            "import os, sys; from pathlib import Path;"
            "from service.server.acceptor import ConnectionLedger;"
            f"ConnectionLedger(Path({str(ledger_path)!r})).publish({held});"
            "print(os.getpid(), flush=True); sys.stdin.read()"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout is not None
        return int(process.stdout.readline())

    yield start
    for process in started:
        process.communicate(timeout=10)


def test_a_lone_worker_has_no_sibling_to_defer_to(ledger_path: Path) -> None:
    ledger = _mine(ledger_path)
    ledger.publish(7)
    assert ledger.least_loaded_sibling() is None


def test_siblings_report_the_least_loaded_count(ledger_path: Path, sibling: Sibling) -> None:
    sibling(5)
    sibling(3)
    mine = _mine(ledger_path)
    mine.publish(9)
    assert mine.least_loaded_sibling() == 3


def test_a_dead_workers_slot_is_cleared_by_the_master(ledger_path: Path, sibling: Sibling) -> None:
    dead = sibling(0)
    mine = _mine(ledger_path)
    assert mine.least_loaded_sibling() == 0
    clear_slot(ledger_path, dead)
    assert mine.least_loaded_sibling() is None


def test_a_stale_slot_is_ignored_and_reclaimed(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, sibling: Sibling
) -> None:
    sibling(0)
    later = acceptor._now_ms() + acceptor.STALE_MS + 1
    monkeypatch.setattr(acceptor, "_now_ms", lambda: later)
    mine = _mine(ledger_path)
    assert mine.least_loaded_sibling() is None
    # The stale slot was the first one, and it was reused.
    assert mine._offset == 0


def test_a_closed_ledger_frees_its_slot(ledger_path: Path) -> None:
    first = _mine(ledger_path)
    first.close()
    second = _mine(ledger_path)
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


def test_the_ledger_is_private_and_made_exclusively(tmp_path: Path) -> None:
    path = create_ledger(tmp_path)
    assert path.parent.parent == tmp_path
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_size == acceptor.LEDGER_BYTES
    # Two masters in one directory never share (or clobber) a ledger.
    assert create_ledger(tmp_path) != path
    acceptor.remove_ledger(path)
    assert not path.parent.exists()


def _write_slot(path: Path, slot: int, pid: int, held: int, beat: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(slot * acceptor._SLOT.size)
        handle.write(acceptor._SLOT.pack(pid, held, beat))


@pytest.mark.parametrize(
    ("pid_of", "held"),
    [
        ("sibling", -1),
        ("sibling", acceptor.MAX_CONNECTIONS + 1),
        ("stranger", 0),  # a live process, but not a child of our master
    ],
)
def test_a_slot_with_a_bogus_count_or_a_foreign_pid_is_ignored(
    ledger_path: Path, sibling: Sibling, pid_of: str, held: int
) -> None:
    real = sibling(7)
    mine = _mine(ledger_path)
    pid = real if pid_of == "sibling" else os.getppid()
    _write_slot(ledger_path, acceptor.SLOTS - 1, pid, held, acceptor._now_ms() + 60_000)
    assert mine.least_loaded_sibling() == 7


def test_a_missing_ledger_leaves_the_worker_without_balancing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine = ConnectionLedger(tmp_path / "gone")
    mine.publish(3)
    assert (mine.least_loaded_sibling(), "FileNotFoundError" in str(mine.broken)) == (None, True)
    mine.close()
    assert caplog.text.count("connection ledger unusable") == 1


def test_a_ledger_cut_short_is_read_not_mapped(ledger_path: Path, sibling: Sibling) -> None:
    sibling(1)
    mine = _mine(ledger_path)
    assert mine.least_loaded_sibling() == 1
    os.truncate(ledger_path, 0)
    mine.publish(5)
    assert mine.least_loaded_sibling() is None
    assert "cut short" in str(mine.broken)


def test_a_full_ledger_of_live_siblings_leaves_the_worker_without_balancing(
    ledger_path: Path, sibling: Sibling
) -> None:
    real = sibling(0)
    for slot in range(acceptor.SLOTS):
        _write_slot(ledger_path, slot, real, 0, acceptor._now_ms() + 60_000)
    mine = _mine(ledger_path)
    assert (mine.least_loaded_sibling(), mine.broken) == (
        None,
        f"full: no free slot of {acceptor.SLOTS}",
    )


def test_slots_filled_by_a_stranger_are_taken_over(ledger_path: Path) -> None:
    for slot in range(acceptor.SLOTS):
        _write_slot(ledger_path, slot, os.getppid(), 0, acceptor._now_ms() + 60_000)
    mine = _mine(ledger_path)
    assert (mine.broken, mine._offset) == (None, 0)


@pytest.mark.parametrize(
    ("held", "least", "ahead"),
    [
        # Below 16 connections, any lead defers to the sibling.
        (1, 0, True),
        (5, 5, False),
        (15, 14, True),
        # Among hundreds, a lead within 1/16 is noise: accept.
        (500, 480, False),
        (500, 468, True),
        (32, 30, False),
        (32, 29, True),
    ],
)
def test_ahead_of_siblings_tolerates_a_lead_of_one_sixteenth(
    held: int, least: int, ahead: bool
) -> None:
    load = acceptor.WorkerLoad(_Ledger(least), connections=[object()] * held)  # type: ignore[arg-type]
    assert load.ahead_of_siblings() is ahead


def test_a_connection_leaving_is_published_at_once(ledger_path: Path) -> None:
    # Not at the next heartbeat: siblings accept while they are not ahead of
    # this count, so a stale high one would let them take a whole burst.
    mine = _mine(ledger_path)
    connections = {object() for _ in range(3)}
    load = acceptor.WorkerLoad(mine, connections)
    load.publish()
    connections.pop()
    load.connection_left()
    assert mine._offset is not None
    _, held, _ = acceptor._SLOT.unpack_from(ledger_path.read_bytes(), mine._offset)
    assert held == 2
