"""Payload capture under real Gunicorn workers: every row of every answered
request is in the files, each worker writes its own, files rotate at the
limit, and a SIGKILLed worker leaves only whole lines."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.capture.files import log_files
from tests.support.bundles import SETOSA, VIRGINICA
from tests.support.scrape import scrape
from tests.support.servers import running_gunicorn, wait_for
from tests.support.v2 import INFER, ROWS, json_request

pytestmark = pytest.mark.process

LIMIT_BYTES = 8 * 1024
# (path, body, rows): each answered request is one event per row.
MIX: list[tuple[str, Any, int]] = [
    ("/predict", SETOSA, 1),
    ("/predict/batch", {"instances": [SETOSA, VIRGINICA, SETOSA]}, 3),
    (INFER, json_request(ROWS), 2),
    (INFER, json_request(ROWS[:1]), 1),
]


def _env(payloads: Path, **extra: str) -> dict[str, str]:
    return {
        "PAYLOAD_LOG_DIR": str(payloads),
        "PAYLOAD_SAMPLE": "1.0",
        "PAYLOAD_LOG_MAX_MB": str(LIMIT_BYTES / 1024 / 1024),
        "PAYLOAD_LOG_FILES": "1000",
        **extra,
    }


def _event_ids(request_id: str, rows: int) -> list[str]:
    return [request_id] if rows == 1 else [f"{request_id}/{row}" for row in range(rows)]


def _send(clients: list[httpx.Client], url: str, rounds: int) -> list[str]:
    """Event ids the answered requests should have written; rounds take the
    clients in turn."""
    expected = []
    for round_number in range(rounds):
        client = clients[round_number % len(clients)]
        for path, body, rows in MIX:
            response = client.post(url + path, json=body)
            assert response.status_code == 200, response.text
            expected += _event_ids(response.headers["x-request-id"], rows)
    return expected


def _events_by_pid(payloads: Path) -> dict[int, list[dict[str, Any]]]:
    events: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for file in sorted(log_files(payloads), key=lambda f: (f.pid, f.sequence)):
        data = file.path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{file.path.name} ends in a cut line"
        events[file.pid] += [json.loads(line) for line in data.splitlines()]
    return events


def test_every_answered_row_is_captured_once_in_each_workers_rotated_files(
    model_dir: Path, tmp_path: Path
) -> None:
    payloads = tmp_path / "payloads"
    fresh = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))
    kept = httpx.Client(timeout=10)
    with (
        fresh,
        kept,
        running_gunicorn(model_dir, tmp_path / "server", env=_env(payloads)) as server,
    ):
        workers = server.worker_pids()
        # Even rounds on one kept connection, odd rounds on new ones: the worker
        # holding the kept connection is ahead of its sibling, which takes the
        # new ones, so both write past the limit whatever order the kernel
        # wakes them in (sequential new connections alone may all go to one).
        expected = _send([kept, fresh], server.url, rounds=40)
        samples = scrape(fresh, server.url)
        assert samples[("payload_log_dropped_total", frozenset())] == 0
        assert server.stop() == 0  # a graceful stop writes what is buffered
    events = _events_by_pid(payloads)
    assert set(events) == workers  # each worker wrote its own files, both served
    assert sorted(e["id"] for pid_events in events.values() for e in pid_events) == sorted(expected)
    files = log_files(payloads)
    for pid in workers:
        written = sum(f.path.stat().st_size for f in files if f.pid == pid)
        rotated = len([f for f in files if f.pid == pid]) > 1
        # Rotation happens at the limit: every worker that wrote past it rotated.
        assert rotated or written <= LIMIT_BYTES, (pid, written)
    assert any(len([f for f in files if f.pid == pid]) > 1 for pid in workers), "no rotation"
    for file in files:
        assert file.path.stat().st_size <= LIMIT_BYTES


def test_a_sigkilled_worker_leaves_whole_lines_and_the_others_lose_nothing(
    model_dir: Path, tmp_path: Path
) -> None:
    payloads = tmp_path / "payloads"
    env = _env(payloads, PAYLOAD_LOG_MAX_MB="1")
    answered: list[tuple[str, int]] = []
    stop = threading.Event()

    def load(url: str) -> None:
        with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not stop.is_set():
                path, body, rows = MIX[len(answered) % len(MIX)]
                try:
                    response = client.post(url + path, json=body)
                except httpx.HTTPError:
                    continue  # the killed worker's connection
                if response.status_code == 200:
                    answered.append((response.headers["x-request-id"], rows))

    with running_gunicorn(model_dir, tmp_path / "server", env=env) as server:
        victim = min(server.worker_pids())
        senders = [threading.Thread(target=load, args=(server.url,)) for _ in range(2)]
        for sender in senders:
            sender.start()
        try:
            # Killed once it has written some lines, with requests still coming.
            wait_for(
                lambda: any(f.pid == victim and f.path.stat().st_size for f in log_files(payloads)),
                30,
                what="the victim's first lines",
            )
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(server.worker_pids() - {victim}) == 2, 30, what="a new worker")
            served = len(answered)
            wait_for(lambda: len(answered) > served + 50, 30, what="requests after the kill")
        finally:
            stop.set()
            for sender in senders:
                sender.join()
        assert server.stop() == 0
        by_worker = {line["request_id"]: line["worker_pid"] for line in server.access_log()}
    events = _events_by_pid(payloads)  # every file, the victim's too: whole lines only
    assert victim in events
    written = {e["id"] for pid_events in events.values() for e in pid_events}
    expected = {
        event_id for request_id, rows in answered for event_id in _event_ids(request_id, rows)
    }
    assert written <= expected
    survivors = {
        event_id
        for request_id, rows in answered
        if by_worker.get(request_id, victim) != victim
        for event_id in _event_ids(request_id, rows)
    }
    assert survivors <= written
