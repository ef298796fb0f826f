"""Folding dead workers' metric files keeps totals exact and the directory small."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from service.metrics.buffered import BufferedHistogram
from service.metrics.store import fold_dead_worker, prepare_directory

WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import Counter, Gauge, Histogram
    c = Counter("jobs_total", "j", ["kind"], registry=None)
    h = Histogram("job_seconds", "s", buckets=(0.1, 1.0), registry=None)
    g = Gauge("worker_up", "u", multiprocess_mode="liveall", registry=None)
    for _ in range(int(sys.argv[1])):
        c.labels("a").inc()
        h.observe(0.5)
    c.labels("b").inc(2)
    g.set(1)
    print(__import__("os").getpid())
    """
)


def _run_worker(directory: Path, count: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(count)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def _scrape(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_folding_a_dead_worker_keeps_every_total(tmp_path: Path) -> None:
    pids = [_run_worker(tmp_path, n) for n in (3, 5, 7)]
    before = _scrape(tmp_path)
    assert before[("jobs_total", (("kind", "a"),))] == 15
    for pid in pids[:2]:
        fold_dead_worker(tmp_path, pid)
    after = _scrape(tmp_path)
    summed = {k: v for k, v in after.items() if k[0] != "worker_up"}
    assert summed == {k: v for k, v in before.items() if k[0] != "worker_up"}
    assert after[("job_seconds_count", ())] == 15
    assert after[("job_seconds_bucket", (("le", "1.0"),))] == 15
    # Gauges of dead workers are gone; the live one remains.
    assert [k for k in after if k[0] == "worker_up"] == [("worker_up", (("pid", str(pids[2])),))]


def test_directory_stays_bounded_over_many_worker_lifetimes(tmp_path: Path) -> None:
    for _ in range(12):
        fold_dead_worker(tmp_path, _run_worker(tmp_path, 2))
    assert sorted(p.name for p in tmp_path.glob("*.db")) == [
        "counter_aggregate.db",
        "histogram_aggregate.db",
    ]
    totals = _scrape(tmp_path)
    assert totals[("jobs_total", (("kind", "a"),))] == 24
    assert totals[("jobs_total", (("kind", "b"),))] == 24
    assert totals[("job_seconds_sum", ())] == 12.0


def test_folding_an_unknown_pid_changes_nothing(tmp_path: Path) -> None:
    _run_worker(tmp_path, 1)
    before = _scrape(tmp_path)
    fold_dead_worker(tmp_path, 999_999)
    assert _scrape(tmp_path) == before


def test_master_start_empties_the_directory(tmp_path: Path) -> None:
    _run_worker(tmp_path, 1)
    (tmp_path / "stale").mkdir()
    prepare_directory(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_buffered_histogram_flush_matches_observe_one_by_one() -> None:
    values = np.array([0.0, 0.5, 1.0, 1.0000001, 2.5, 3.0, 99.0, -4.0], dtype=np.float32)
    buckets = (0.5, 1.0, 2.5)
    one_by_one = Histogram("a", "a", buckets=buckets, registry=None)
    bulk = Histogram("b", "b", buckets=buckets, registry=None)
    for value in values:
        one_by_one.observe(float(value))
    buffered = BufferedHistogram(bulk)
    buffered.add_many(values[:5])
    for value in values[5:]:
        buffered.add_one(float(value))
    assert [b.get() for b in bulk._buckets] == [0.0] * len(bulk._buckets)  # not before a flush
    buffered.flush()
    assert [b.get() for b in bulk._buckets] == [b.get() for b in one_by_one._buckets]
    assert (
        bulk._sum.get() == np.float32(one_by_one._sum.get())
        or abs(bulk._sum.get() - one_by_one._sum.get()) < 1e-4
    )
