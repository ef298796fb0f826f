"""The multiprocess metrics directory: prepared by the Gunicorn master, folded
when a worker exits so it stays proportional to the live workers.

prometheus_client keeps one file per worker and metric type. Left alone, every
recycled worker leaves its files behind and scrapes slow down without bound
(prometheus/client_python #275, #367). When a worker exits, the master adds
its counter and histogram values into one aggregate file per type and deletes
the worker's files. Scrapes take a shared lock and the fold an exclusive one,
so no scrape sees a value in both places or in neither: totals never jump.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.metrics.client_internals import add_file_into_aggregate, process_file

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
LOCK_FILE = ".fold.lock"
# Counters and histograms sum across processes; gauges are per live worker.
SUMMED_TYPES = ("counter", "histogram")


def ensure_multiproc_dir() -> Path:
    """Outside Gunicorn (uvicorn directly, tests) give this process a private directory."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured)
    else:
        path = Path(tempfile.mkdtemp(prefix="ml-api-metrics-"))
        os.environ[ENV_VAR] = str(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_directory(path: Path) -> None:
    """Called by the master before any worker starts: values from an earlier
    server would otherwise be added to this one's."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextmanager
def directory_lock(path: Path, *, exclusive: bool) -> Iterator[None]:
    with (path / LOCK_FILE).open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fold_dead_worker(path: Path, pid: int) -> None:
    """Move a dead worker's counters and histograms into the aggregate files
    and drop its live gauges."""
    from prometheus_client import multiprocess

    with directory_lock(path, exclusive=True):
        for metric_type in SUMMED_TYPES:
            dead = process_file(path, metric_type, pid)
            if not dead.exists():
                continue
            add_file_into_aggregate(path, metric_type, dead)
            dead.unlink()
        multiprocess.mark_process_dead(pid, str(path))
