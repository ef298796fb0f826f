"""Even spread of connections across Gunicorn workers that share one listening socket.

Every worker waits on the same listening socket and the kernel wakes all of
them; whichever runs first accepts everything queued. A client that opens its
keep-alive connections at once (wrk, nginx's upstream pool) then often lands
all of them on one worker, and the server runs at half speed until it
reconnects. Here each worker publishes how many connections it holds in a
small shared ledger and, while it holds more than the least-loaded live
sibling, leaves the queue to that sibling for a moment.

The queue stays the kernel's one shared queue: a worker that dies or drains
leaves nothing behind that another worker cannot accept (unlike
SO_REUSEPORT, whose per-socket queues are reset when their socket closes).
A deferral lasts at most `MAX_DEFER_SECONDS`, so a busy or hung sibling delays
a new connection by that much at worst, never indefinitely.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Sized
from pathlib import Path

log = logging.getLogger("ml_api")

LEDGER_ENV = "ML_API_CONNECTION_LEDGER"
LEDGER_NAME = "connections"
SLOTS = 256
# pid, connections held, last heartbeat (monotonic ms; CLOCK_MONOTONIC is system-wide).
_SLOT = struct.Struct("<iiq")
LEDGER_BYTES = SLOTS * _SLOT.size
HEARTBEAT_SECONDS = 0.1
# A slot not refreshed for this long belongs to a dead or stuck worker.
STALE_MS = 1000
# A count beyond this (far more connections than a worker can hold) is not one.
MAX_CONNECTIONS = 1 << 20
RETRY_SECONDS = 0.0005
# A worker is ahead of a sibling when it holds more than 1/16 above it (exact below 16).
AHEAD_TOLERANCE_DIVISOR = 16
# Connections accepted on one wake-up at most (asyncio's own server takes its backlog's worth).
ACCEPT_BATCH = 128
MAX_DEFER_SECONDS = 0.002
# Keep-alive connections stay where they were accepted: after a sibling
# restarts (a max_requests recycle, a crash) it would sit idle while this
# worker kept them all. Ahead of the least-loaded sibling by this many, the
# worker asks half the difference to reconnect, at most this often.
REBALANCE_GAP = 4
REBALANCE_EVERY_SECONDS = 0.5


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def create_ledger(parent: Path) -> Path:
    """In the master, before any worker exists: the ledger file in a private
    directory of its own under `parent` (mode 0700, an unpredictable name),
    created exclusively, never through a symlink, mode 0600."""
    directory = Path(tempfile.mkdtemp(prefix="ml-api-", dir=parent))
    path = directory / LEDGER_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.pwrite(fd, bytes(LEDGER_BYTES), 0)
    finally:
        os.close(fd)
    return path


def remove_ledger(path: Path) -> None:
    """In the master, on exit."""
    path.unlink(missing_ok=True)
    # Not empty, or gone: then nothing of ours is left to remove.
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def clear_slot(path: Path, pid: int) -> None:
    """In the master, when a worker exits: its connections are gone with it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        data = os.pread(fd, LEDGER_BYTES, 0)
        whole = data[: len(data) // _SLOT.size * _SLOT.size]
        for slot, (owner, _, _) in enumerate(_SLOT.iter_unpack(whole)):
            if owner == pid:
                os.pwrite(fd, bytes(_SLOT.size), slot * _SLOT.size)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            return int(stat.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class ConnectionLedger:
    """This worker's slot in the shared ledger, and a view of its siblings'.

    The file is shared with other processes, so nothing in it is trusted: it
    is read with pread (a file cut short is a short read, where a mapping
    would be SIGBUS), a slot counts only if its pid is a live child of this
    worker's master and its count is in 0..MAX_CONNECTIONS, and a ledger that
    is missing, short or full leaves the worker serving without balancing
    (`broken` says why; logged once), never stops it.
    """

    def __init__(self, path: Path, master: int | None = None) -> None:
        self.path = path
        self.broken: str | None = None
        self._pid = os.getpid()
        self._master = os.getppid() if master is None else master
        # pid -> whether it is a child of our master, for the pids seen in slots.
        self._siblings: dict[int, bool] = {}
        self._checks_proc = os.path.exists(f"/proc/{self._pid}/stat")
        self._offset: int | None = None
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._offset = self._claim(self._fd)
        except OSError as exc:
            self._break(f"{type(exc).__name__}: {exc.strerror or exc}")

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.warning(
                "connection ledger unusable; this worker serves without balancing",
                extra={"fields": {"ledger": str(self.path), "reason": reason}},
            )

    def _read(self) -> bytes | None:
        if self._fd is None or self.broken is not None:
            return None
        try:
            data = os.pread(self._fd, LEDGER_BYTES, 0)
        except OSError as exc:
            self._break(f"read failed: {exc.strerror or exc}")
            return None
        if len(data) != LEDGER_BYTES:
            self._break(f"cut short: {len(data)} of {LEDGER_BYTES} bytes")
            return None
        return data

    def _claim(self, fd: int) -> int | None:
        # Workers boot concurrently: claim under an exclusive lock.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            data = self._read()
            if data is None:
                return None
            now = _now_ms()
            for slot, (pid, _, beat) in enumerate(_SLOT.iter_unpack(data)):
                if pid == 0 or now - beat > STALE_MS or not self._is_sibling(pid):
                    offset = slot * _SLOT.size
                    os.pwrite(fd, _SLOT.pack(self._pid, 0, now), offset)
                    return offset
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._break(f"full: no free slot of {SLOTS}")
        return None

    def _is_sibling(self, pid: int) -> bool:
        known = self._siblings.get(pid)
        if known is None:
            if len(self._siblings) > 2 * SLOTS:
                self._siblings.clear()
            known = self._siblings[pid] = pid > 0 and (
                not self._checks_proc or _parent_of(pid) == self._master
            )
        return known

    def publish(self, connections: int) -> None:
        if self._fd is None or self._offset is None or self.broken is not None:
            return
        try:
            os.pwrite(self._fd, _SLOT.pack(self._pid, connections, _now_ms()), self._offset)
        except OSError as exc:
            self._break(f"write failed: {exc.strerror or exc}")

    def least_loaded_sibling(self) -> int | None:
        """Connections held by the least-loaded live sibling; None when there is
        none, or when the ledger cannot be trusted."""
        data = self._read()
        if data is None:
            return None
        now = _now_ms()
        least: int | None = None
        for pid, held, beat in _SLOT.iter_unpack(data):
            if (
                pid == 0
                or pid == self._pid
                or now - beat > STALE_MS
                or not 0 <= held <= MAX_CONNECTIONS
                or not self._is_sibling(pid)
            ):
                continue
            if least is None or held < least:
                least = held
        return least

    def close(self) -> None:
        if self._fd is None:
            return
        if self._offset is not None and self.broken is None:
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, bytes(_SLOT.size), self._offset)
        os.close(self._fd)
        self._fd = None


class WorkerLoad:
    """The connections this worker holds, kept current in its ledger slot, and
    handed back when it holds too many (see REBALANCE_GAP)."""

    def __init__(
        self,
        ledger: ConnectionLedger,
        connections: Sized,
        shed: Callable[[int], int] | None = None,
    ) -> None:
        self.ledger = ledger
        self._connections = connections
        # Asks up to n connections to close once their current answer is
        # sent (clients reconnect, to the least-loaded worker); returns how many.
        self._shed = shed
        self._next_rebalance = 0.0
        # Accepted, but not yet in `connections` (connection_made runs a tick later).
        self.handshaking = 0
        self._heartbeat: asyncio.TimerHandle | None = None

    def held(self) -> int:
        return len(self._connections) + self.handshaking

    def publish(self) -> None:
        self.ledger.publish(self.held())

    def connection_left(self) -> None:
        """Published at once, as an accept is: a count left high until the next
        heartbeat would have siblings take a whole burst of new connections
        (they accept while not ahead of it) against connections that are gone."""
        self.publish()

    def start(self) -> None:
        self.publish()
        self.rebalance()
        self._heartbeat = asyncio.get_running_loop().call_later(HEARTBEAT_SECONDS, self.start)

    def rebalance(self) -> int:
        """Shed half the lead over the least-loaded sibling, if it is large."""
        now = time.monotonic()
        if self._shed is None or now < self._next_rebalance:
            return 0
        least = self.ledger.least_loaded_sibling()
        if least is None or self.held() - least < REBALANCE_GAP:
            return 0
        # The ledger shows the result a heartbeat or more later: wait for it.
        self._next_rebalance = now + REBALANCE_EVERY_SECONDS
        return self._shed((self.held() - least) // 2)

    def ahead_of_siblings(self) -> bool:
        """Holding more than the least-loaded sibling, give or take a small
        fraction: among hundreds of busy connections per worker a lead of a
        few is noise, and deferring over it (a deferral waits out a whole
        busy event-loop turn) would leave new connections queued for seconds."""
        least = self.ledger.least_loaded_sibling()
        if least is None:
            return False
        held = self.held()
        return held > least + held // AHEAD_TOLERANCE_DIVISOR

    def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self.ledger.close()


class BalancedAcceptor:
    """Accepts from a shared listening socket while this worker is not ahead of
    its least-loaded sibling. Looks like an asyncio Server to uvicorn's shutdown."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        load: WorkerLoad,
        max_connections: int,
        make_room: Callable[[], bool],
    ) -> None:
        self._sock = sock
        self._factory = protocol_factory
        self._load = load
        self._max_connections = max_connections
        # Closes an idle connection to admit a new one; False if none is idle.
        self._make_room = make_room
        self._loop = asyncio.get_running_loop()
        self._deferred_since: float | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        # Everything queued, up to a batch, while this worker is not ahead: one
        # accept per event-loop turn left new connections (a health check
        # among them) waiting behind a whole turn of busy keep-alive
        # connections each.
        for _ in range(ACCEPT_BATCH):
            if self._defer():
                # Stop watching for a moment so the sibling's wake-up wins the race.
                self._loop.remove_reader(self._sock.fileno())
                self._retry = self._loop.call_later(RETRY_SECONDS, self._resume)
                return
            # Deferred or not, the next connection may be left to a sibling afresh.
            self._deferred_since = None
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break  # the queue is empty, or a sibling took the rest
            except ConnectionAbortedError:
                continue  # the client gave up
            except OSError:
                break  # EMFILE and friends: the next wake-up tries again
            if self._over_limit():
                # Every connection has a request in progress: this one waits for none.
                conn.close()
                self._count_over_limit()
                continue
            conn.setblocking(False)
            self._load.handshaking += 1
            self._load.publish()
            self._loop.create_task(self._attach(conn))

    def _over_limit(self) -> bool:
        held = self._load.held()
        if held < self._max_connections or self._make_room():
            return False
        # Connections still handshaking have sent nothing: idle, but not yet
        # in the set make_room chooses from. Up to a batch of them may take
        # the cap over (connection_cap leaves room for that), so a client
        # arriving among a flood of them is not turned away.
        return not (self._load.handshaking and held < self._max_connections + ACCEPT_BATCH)

    @staticmethod
    def _count_over_limit() -> None:
        # Imported on the first refusal: a worker that never refuses loads nothing.
        from service.metrics.connections import count_closed

        count_closed("over_limit")

    def _defer(self) -> bool:
        """Whether to leave the queue to a less-loaded sibling for now: not
        once it has been left MAX_DEFER_SECONDS (the sibling is busy)."""
        if not self._load.ahead_of_siblings():
            return False
        now = self._loop.time()
        if self._deferred_since is None:
            self._deferred_since = now
        return now - self._deferred_since < MAX_DEFER_SECONDS

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    async def _attach(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()
        finally:
            self._load.handshaking -= 1

    # The asyncio.Server surface uvicorn's shutdown uses.
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        if self._retry is not None:
            self._retry.cancel()

    async def wait_closed(self) -> None:
        return None
