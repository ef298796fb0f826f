"""Metrics stay exact across three real workers, whichever answers the scrape,
through crashes and recycling."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from service.metrics.buffered import FLUSH_SECONDS
from tests.support.bundles import SETOSA, VIRGINICA
from tests.support.scrape import Samples, sample, scrape, series
from tests.support.servers import Gunicorn, running_gunicorn, wait_for

pytestmark = pytest.mark.process

WORKERS = 3
FLUSH_BOUND_SECONDS = 5 * FLUSH_SECONDS
# (method, path, body, expected status); sent over fresh connections so all workers serve.
MIX: list[tuple[str, str, object, int]] = [
    ("POST", "/predict", SETOSA, 200),
    ("POST", "/predict", VIRGINICA, 200),
    ("POST", "/predict", {"sepal_length": True}, 422),
    ("POST", "/predict/batch", {"instances": [SETOSA, VIRGINICA]}, 200),
    ("GET", "/health", None, 200),
    ("GET", "/no/such/path", None, 404),
]


def _client() -> httpx.Client:
    return httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def _send_mix(client: httpx.Client, url: str, rounds: int) -> Counter[tuple[str, str, str]]:
    sent: Counter[tuple[str, str, str]] = Counter()
    for _ in range(rounds):
        for method, path, body, status in MIX:
            response = client.request(method, url + path, json=body)
            assert response.status_code == status, response.text
            handler = path if status != 404 else "none"
            sent[(method, handler, str(status))] += 1
    return sent


def _counted(samples: Samples) -> Counter[tuple[str, str, str]]:
    counted: Counter[tuple[str, str, str]] = Counter()
    for labels, value in series(samples, "http_requests_total").items():
        label = dict(labels)
        if label["handler"] != "/health/ready":  # the test harness polls readiness
            counted[(label["method"], label["handler"], label["status"])] = int(value)
    return counted


def _assert_exact(samples: Samples, sent: Counter[tuple[str, str, str]]) -> None:
    assert _counted(samples) == sent
    per_handler: Counter[tuple[str, str]] = Counter()
    for (method, handler, _), count in sent.items():
        per_handler[(method, handler)] += count
    for (method, handler), count in per_handler.items():
        assert (
            sample(samples, "http_request_duration_seconds_count", method=method, handler=handler)
            == count
        )


def _settled(client: httpx.Client, url: str, sent: Counter[tuple[str, str, str]]) -> Samples:
    """A scrape once every worker has flushed its buffered histograms
    (service.metrics.buffered: within FLUSH_SECONDS). Counters are exact at
    once; only the histograms may lag."""
    settled: list[Samples] = []

    def flushed() -> bool:
        samples = scrape(client, url)
        assert _counted(samples) == sent  # counters never lag
        try:
            _assert_exact(samples, sent)
        except AssertionError:
            return False
        settled.append(samples)
        return True

    wait_for(flushed, FLUSH_BOUND_SECONDS, interval=0.1, what="buffered histograms to be flushed")
    return settled[-1]


def _metrics_files(log_dir: Path) -> list[str]:
    return sorted(p.name for p in (log_dir / "metrics").glob("*.db"))


def test_totals_are_exact_whichever_worker_answers_the_scrape(
    model_dir: Path, tmp_path: Path
) -> None:
    with running_gunicorn(model_dir, tmp_path / "logs", workers=WORKERS) as server, _client() as c:
        sent = _send_mix(c, server.url, rounds=15)
        _settled(c, server.url, sent)
        scrapes = [scrape(c, server.url) for _ in range(12)]
        scraped_by = {
            line["worker_pid"] for line in server.access_log() if line["path"] == "/metrics"
        }
    assert len(scraped_by) >= 2, "every scrape landed on one worker; the test proves nothing"
    for samples in scrapes:
        _assert_exact(samples, sent)
        labels = {"model": "iris", "version": "1.0.0"}
        assert sample(samples, "model_predictions_total", **labels, **{"class": "setosa"}) == 30
        assert sample(samples, "model_predictions_total", **labels, **{"class": "virginica"}) == 30
        assert sample(samples, "model_batch_rows_count", **labels) == 45
        assert len(series(samples, "process_resident_memory_bytes")) == WORKERS


def _replace_worker(server: Gunicorn, victim: int, how: int) -> None:
    loaded = server.loaded_count()
    os.kill(victim, how)
    wait_for(
        lambda: (
            victim not in server.worker_pids()
            and len(server.worker_pids()) == WORKERS
            and server.loaded_count() > loaded
        ),
        30,
        what="a replacement worker",
    )


def test_a_sigkilled_worker_takes_none_of_the_totals_with_it(
    model_dir: Path, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    with running_gunicorn(model_dir, log_dir, workers=WORKERS) as server, _client() as c:
        before_kill = _send_mix(c, server.url, rounds=10)
        _settled(c, server.url, before_kill)
        victim = min(server.worker_pids())
        _replace_worker(server, victim, signal.SIGKILL)
        after_kill = scrape(c, server.url)
        after_more = before_kill + _send_mix(c, server.url, rounds=5)
        final = _settled(c, server.url, after_more)
        files = _metrics_files(log_dir)
    _assert_exact(after_kill, before_kill)
    _assert_exact(final, after_more)
    pids = {dict(labels)["pid"] for labels in series(final, "process_resident_memory_bytes")}
    assert str(victim) not in pids
    assert len(pids) == WORKERS
    assert not any(str(victim) in name for name in files)


def test_recycling_workers_fifty_times_keeps_totals_and_a_small_directory(
    model_dir: Path, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    env = {"MAX_REQUESTS": "2", "MAX_REQUESTS_JITTER": "0"}
    target_restarts, deadline = 50, time.monotonic() + 240
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    with running_gunicorn(model_dir, log_dir, workers=WORKERS, env=env) as server:

        def restarts() -> int:
            return server.stderr().count("Booting worker") - WORKERS

        def traffic() -> None:
            with _client() as c:
                while restarts() < target_restarts and time.monotonic() < deadline:
                    code = c.post(f"{server.url}/predict", json=SETOSA).status_code
                    with lock:
                        statuses[code] += 1

        senders = [threading.Thread(target=traffic) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        with _client() as c:
            samples = scrape(c, server.url)
        restarted = restarts()

        def only_live_workers_files() -> bool:
            # A listing is no snapshot: one taken while the last recycle (the
            # scrape was a worker's second request) folds the old worker's
            # files and the new worker creates its own can hold both.
            files = _metrics_files(log_dir)
            pids = {str(pid) for pid in server.worker_pids()}
            owners = {name.rsplit("_", 1)[1].removesuffix(".db") for name in files}
            # Per live worker: counter, histogram and three live-gauge files;
            # plus two aggregates.
            return owners <= pids | {"aggregate"} and len(files) <= WORKERS * 5 + 2

        wait_for(only_live_workers_files, 30, what="only the live workers' metrics files")
    assert restarted >= target_restarts
    assert set(statuses) == {200}, statuses
    sent = statuses[200]
    assert (
        sample(samples, "http_requests_total", method="POST", handler="/predict", status="200")
        == sent
    )
    assert (
        sample(
            samples, "model_predictions_total", model="iris", version="1.0.0", **{"class": "setosa"}
        )
        == sent
    )
