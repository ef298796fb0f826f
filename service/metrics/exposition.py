"""GET /metrics: one scrape returns every worker's values, aggregated."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics.buffered import flush_all
from service.metrics.instruments import CPU_SECONDS, OPEN_FDS, RESIDENT_MEMORY
from service.metrics.rollouts import RolloutCollector
from service.metrics.store import ENV_VAR, directory_lock

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def update_process_metrics() -> None:
    """This worker's memory, CPU time and open files, from /proc (Linux)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            RESIDENT_MEMORY.set(int(statm.read().split()[1]) * _PAGE_SIZE)
        with open("/proc/self/stat", "rb") as stat:
            # Fields after the parenthesised command name; utime, stime are 14, 15.
            fields = stat.read().rsplit(b")", 1)[1].split()
            CPU_SECONDS.set((int(fields[11]) + int(fields[12])) / _CLOCK_TICKS)
        OPEN_FDS.set(len(os.listdir("/proc/self/fd")))
    except OSError:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        CPU_SECONDS.set(usage.ru_utime + usage.ru_stime)


def render_metrics() -> bytes:
    update_process_metrics()
    # This worker's buffered statistics are current in its own scrapes.
    flush_all()
    path = Path(os.environ[ENV_VAR])
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    registry.register(RolloutCollector(path))
    with directory_lock(path, exclusive=False):
        return generate_latest(registry)
