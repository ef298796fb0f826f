"""The prometheus_client internals service.metrics.client_internals relies on,
pinned: an upgrade that changes them fails here, by name, rather than as wrong
totals in the multi-worker tests."""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import client_internals
from service.metrics.store import ENV_VAR

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(directory: Path, prefix: str) -> Samples:
    """The samples of metrics named `prefix`..., as a scrape of `directory` shows them."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if sample.name.startswith(prefix)
    }


def _directory() -> Path:
    return Path(os.environ[ENV_VAR])


def test_the_value_class_is_a_module_global_read_when_a_metric_is_made() -> None:
    # service.metrics (imported by the conftest) swapped in the lean class.
    lean = values.ValueClass
    assert getattr(lean, "_lean", False)
    assert lean.__mro__[1].__name__ == "MmapedValue"
    assert lean._multiprocess is True
    assert values.MutexValue._multiprocess is False  # install's guard without the env var
    child = Counter("internals_value_class_total", "c", ["k"], registry=None).labels("a")
    assert type(child._value) is lean


def test_the_lean_increment_writes_what_the_library_increment_writes() -> None:
    library_inc = values.ValueClass.__mro__[1].inc
    source = inspect.getsource(library_inc)
    # What the lean inc leaves out: the lock and the pid check; what it keeps:
    # the running value, written with a zero timestamp.
    assert "self._value += amount" in source
    assert "self._timestamp = 0.0" in source
    assert "self._file.write_value(self._key, self._value, self._timestamp)" in source
    counter = Counter("internals_lean_total", "c", ["way"], registry=None)
    lean, library = counter.labels("lean")._value, counter.labels("library")._value
    for amount in (1.0, 2.5, 1e6):
        lean.inc(amount)
        library_inc(library, amount)
    assert lean._file is library._file
    mapping = lean._file._m
    written = [
        mapping[value._file._positions[value._key] : value._file._positions[value._key] + 16]
        for value in (lean, library)
    ]
    assert written[0] == written[1]
    assert lean.get() == library.get() == 1000003.5


def test_the_incrementer_counts_on_the_shared_file() -> None:
    counter = Counter("internals_incrementer_total", "c", ["k"], registry=None)
    count = client_internals.incrementer(counter.labels("a"))
    for _ in range(3):
        count(1)
    count(4)
    assert _scrape(_directory(), "internals_incrementer") == {
        ("internals_incrementer_total", (("k", "a"),)): 7.0
    }


def test_bulk_histogram_counts_scrape_as_observe_would() -> None:
    buckets = (1.0, 2.0)
    bulk = Histogram("internals_bulk_seconds", "h", buckets=buckets, registry=None)
    observed = Histogram("internals_observed_seconds", "h", buckets=buckets, registry=None)
    assert client_internals.upper_bounds(bulk) == [1.0, 2.0, float("inf")]
    for value in (0.5, 1.5, 1.5, 9.0):
        observed.observe(value)
    client_internals.add_to_histogram(bulk, [1, 2, 0], 3.5)
    client_internals.add_to_histogram(bulk, [0, 0, 1], 9.0)
    renamed = {
        (name.replace("internals_bulk", "internals_observed"), labels): value
        for (name, labels), value in _scrape(_directory(), "internals_bulk").items()
    }
    assert renamed == _scrape(_directory(), "internals_observed")
    assert renamed[("internals_observed_seconds_count", ())] == 4


def test_each_process_keeps_a_type_in_the_file_process_file_names() -> None:
    Counter("internals_files_total", "c", registry=None).inc()
    Histogram("internals_files_seconds", "h", registry=None).observe(1)
    pid = os.getpid()
    for metric_type in ("counter", "histogram"):
        assert client_internals.process_file(_directory(), metric_type, pid).is_file()


def test_an_aggregate_file_scrapes_as_the_sum_of_what_was_added(tmp_path: Path) -> None:
    Counter("internals_fold_total", "c", ["k"], registry=None).labels("a").inc(5)
    Histogram("internals_fold_seconds", "h", buckets=(1.0,), registry=None).observe(0.5)
    live = _scrape(_directory(), "internals_fold")
    for metric_type in ("counter", "histogram"):
        source = client_internals.process_file(_directory(), metric_type, os.getpid())
        for dead_pid in (1, 2):
            dead = client_internals.process_file(tmp_path, metric_type, dead_pid)
            shutil.copyfile(source, dead)
            client_internals.add_file_into_aggregate(tmp_path, metric_type, dead)
            dead.unlink()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "counter_aggregate.db",
        "histogram_aggregate.db",
    ]
    # The collector takes the type from the file name, and the entries' keys and
    # values survive the merge: twice the live values, in counter and histogram form.
    assert _scrape(tmp_path, "internals_fold") == {key: 2 * value for key, value in live.items()}
