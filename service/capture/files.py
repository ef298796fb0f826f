"""The payload log's files: one open file per worker, rotated by size, the
finished ones pruned to a count.

A file is `payloads-<host>-<pid>-<sequence>.jsonl`: each worker appends to its
own (no two processes ever interleave lines), and a rotation starts the next
sequence number instead of renaming, so a log shipper following files by name
never sees one change under it. The host (a container's hostname) keeps
replicas sharing a volume apart: a worker only prunes its own host's files,
where a pid's liveness means something.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "payloads"
SUFFIX = ".jsonl"
_UNSAFE = re.compile(r"[^A-Za-z0-9._]")
_NAME = re.compile(rf"{PREFIX}-(?P<host>.+)-(?P<pid>\d+)-(?P<sequence>\d+){re.escape(SUFFIX)}")


def host_name() -> str:
    return _UNSAFE.sub("_", socket.gethostname()) or "host"


@dataclass(frozen=True)
class LogFile:
    path: Path
    host: str
    pid: int
    sequence: int


def log_files(directory: Path) -> list[LogFile]:
    found = []
    for path in directory.glob(f"{PREFIX}-*{SUFFIX}"):
        match = _NAME.fullmatch(path.name)
        if match is not None:
            found.append(LogFile(path, match["host"], int(match["pid"]), int(match["sequence"])))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class RotatingFiles:
    """Appends whole batches of lines to this worker's current file: one
    write(2) each, straight to the kernel (nothing buffered in the process, so
    a SIGKILL loses only what was never handed over)."""

    def __init__(self, directory: Path, max_bytes: int, keep_files: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep_files = keep_files
        self.host = host_name()
        self.pid = os.getpid()
        self._fd: int | None = None
        self._size = 0
        self.path: Path | None = None
        mine = [
            f.sequence for f in log_files(directory) if (f.host, f.pid) == (self.host, self.pid)
        ]
        # A pid the system reused: continue after its files, never into them.
        self._sequence = max(mine, default=0)

    def open(self) -> None:
        """The first file, at start: a directory that cannot be written is
        found before the first request."""
        self._open_next()

    def write(self, lines: Sequence[bytes]) -> None:
        """Each run of lines that fits the current file in one write(2); a
        file passes `max_bytes` only if a single line does."""
        start = 0
        while start < len(lines):
            if self._fd is None or self._unlinked():
                self._open_next()
            room = self.max_bytes - self._size
            end, size = start, 0
            while end < len(lines) and size + len(lines[end]) <= room:
                size += len(lines[end])
                end += 1
            if end == start:
                if self._size:
                    self._open_next()
                    continue
                end, size = start + 1, len(lines[start])  # one line over the limit: alone
            self._write_all(b"".join(lines[start:end]))
            self._size += size
            start = end

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _unlinked(self) -> bool:
        # Removed by someone else (an operator, another host's cleanup): a new file.
        assert self._fd is not None
        return os.fstat(self._fd).st_nlink == 0

    def _open_next(self) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        self.path = self.directory / f"{PREFIX}-{self.host}-{self.pid}-{self._sequence:06d}{SUFFIX}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
        self.prune()

    def prune(self) -> None:
        """Keep the newest `keep_files` finished files of this host; a live
        worker's open file (its highest sequence) is never finished."""
        files = [f for f in log_files(self.directory) if f.host == self.host]
        newest: dict[int, int] = {}
        for file in files:
            newest[file.pid] = max(newest.get(file.pid, 0), file.sequence)
        open_files = {
            (pid, sequence) for pid, sequence in newest.items() if pid == self.pid or _alive(pid)
        }
        finished = [f for f in files if (f.pid, f.sequence) not in open_files]
        finished.sort(key=_age)
        for file in finished[: max(0, len(finished) - self.keep_files)]:
            with contextlib.suppress(FileNotFoundError):
                file.path.unlink()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _age(file: LogFile) -> tuple[float, int, int]:
    try:
        modified = file.path.stat().st_mtime
    except FileNotFoundError:
        modified = 0.0
    return (modified, file.pid, file.sequence)
