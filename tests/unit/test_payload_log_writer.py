"""The payload log's writer: files rotate before they pass the limit, the
finished ones are pruned to the count kept, a full buffer drops and counts,
and an event holds the CloudEvents attributes and the prediction, nothing else."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.capture.events import Captured, event_lines
from service.capture.files import RotatingFiles, host_name, log_files
from service.capture.writer import PayloadWriter
from service.manifest import Manifest
from service.shadow.scorer import ResultState, ShadowResult

LINE = b'{"line": "' + b"x" * 87 + b'"}\n'  # 100 bytes


@pytest.fixture(scope="module")
def manifest(trained_bundle: Path) -> Manifest:
    return Manifest.model_validate_json((trained_bundle / "manifest.json").read_text())


def captured(manifest: Manifest, request_id: str = "r1", rows: int = 1) -> Captured:
    inputs = np.tile([5.1, 3.5, 1.4, 0.2], (rows, 1))
    outputs = np.tile(np.array([0.9, 0.05, 0.05], dtype=np.float32), (rows, 1))
    return Captured(request_id, "/predict", 1_700_000_000.25, manifest, inputs, outputs)


def sizes_in_order(directory: Path) -> list[int]:
    return [f.path.stat().st_size for f in sorted(log_files(directory), key=lambda f: f.sequence)]


def test_a_file_is_rotated_before_a_line_would_pass_the_limit(tmp_path: Path) -> None:
    files = RotatingFiles(tmp_path, max_bytes=350, keep_files=100)
    for lines in (2, 1, 1, 3, 1):
        files.write([LINE] * lines)
    files.close()
    # A batch is split at the line that would pass the limit.
    assert sizes_in_order(tmp_path) == [300, 300, 200]
    for file in log_files(tmp_path):
        assert file.path.read_bytes() == LINE * (file.path.stat().st_size // len(LINE))


def test_a_line_larger_than_the_limit_gets_a_file_of_its_own(tmp_path: Path) -> None:
    files = RotatingFiles(tmp_path, max_bytes=150, keep_files=100)
    files.write([LINE, LINE * 2, LINE])
    files.close()
    assert sizes_in_order(tmp_path) == [100, 200, 100]


def test_only_the_newest_finished_files_are_kept(tmp_path: Path) -> None:
    files = RotatingFiles(tmp_path, max_bytes=100, keep_files=2)
    for _ in range(6):
        files.write([LINE])
    files.close()
    kept = sorted(f.sequence for f in log_files(tmp_path))
    assert kept == [4, 5, 6]  # two finished files and the open one


def test_pruning_spares_live_workers_open_files_and_not_dead_ones(tmp_path: Path) -> None:
    host = host_name()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    for pid in (dead_pid, live_pid):
        path = tmp_path / f"payloads-{host}-{pid}-000001.jsonl"
        path.write_bytes(LINE)
        os.utime(path, (1, 1))  # older than anything this worker writes
    other_host = tmp_path / "payloads-elsewhere-1-000001.jsonl"
    other_host.write_bytes(LINE)
    files = RotatingFiles(tmp_path, max_bytes=100, keep_files=0)
    files.write([LINE])
    files.close()
    left = {(f.host, f.pid) for f in log_files(tmp_path)}
    assert left == {(host, live_pid), (host, os.getpid()), ("elsewhere", 1)}


def test_a_full_buffer_drops_and_counts_without_blocking(
    tmp_path: Path, manifest: Manifest
) -> None:
    counted: list[int] = []
    files = RotatingFiles(tmp_path, max_bytes=1 << 20, keep_files=1)
    writer = PayloadWriter(files, counted.append, buffer_requests=3)
    for index in range(5):  # the thread is not running yet: nothing drains the buffer
        writer.submit(captured(manifest, f"r{index}"))
    assert counted == [1, 1]
    assert writer.dropped == 2
    writer.start()
    writer.close()
    lines = b"".join(f.path.read_bytes() for f in log_files(tmp_path)).splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r0", "r1", "r2"]


def test_requests_the_disk_refused_are_counted_as_drops(tmp_path: Path, manifest: Manifest) -> None:
    directory = tmp_path / "payloads"
    files = RotatingFiles(directory, max_bytes=1 << 20, keep_files=1)
    files.open()
    # The directory gone and a file in its place: the next file cannot be made.
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    directory.write_bytes(b"")
    counted: list[int] = []
    writer = PayloadWriter(files, counted.append, flush_seconds=0.01)
    writer.start()
    writer.submit(captured(manifest, "lost", rows=2))
    writer.close()  # the thread wrote (and failed) before it stopped
    writer.submit(captured(manifest, "next"))  # reported from the request path
    assert sum(counted) == 1
    assert writer.dropped == 1


def test_an_event_holds_the_cloud_event_and_the_prediction_only(manifest: Manifest) -> None:
    (line,) = event_lines(captured(manifest, "abc"))
    event = json.loads(line)
    assert event == {
        "specversion": "1.0",
        "id": "abc",
        "source": "/predict",
        "type": "ml-api.prediction",
        "time": "2023-11-14T22:13:20.250000Z",
        "datacontenttype": "application/json",
        "requestid": "abc",
        "data": {
            "model": {"name": "iris", "version": "1.0.0"},
            "row": 0,
            "inputs": {
                "sepal_length": 5.1,
                "sepal_width": 3.5,
                "petal_length": 1.4,
                "petal_width": 0.2,
            },
            "outputs": {
                "predicted_class": 0,
                "predicted_class_name": manifest.classes[0],  # type: ignore[index]
                "probabilities": dict(zip(manifest.classes or [], [0.9, 0.05, 0.05], strict=True)),
            },
        },
    }


def test_each_row_s_event_carries_the_shadow_s_answer_for_it(manifest: Manifest) -> None:
    names = manifest.classes or []
    candidate = np.array([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7]], dtype=np.float32)
    result = ShadowResult("1.1.0", "scored", candidate, np.array([True, False]))
    record = dataclasses.replace(captured(manifest, "abc", rows=2), shadow=result)
    events = [json.loads(line) for line in event_lines(record)]
    assert [e["data"]["shadow"] for e in events] == [
        {
            "version": "1.1.0",
            "state": "scored",
            "agree": True,
            "outputs": events[0]["data"]["outputs"],
        },
        {
            "version": "1.1.0",
            "state": "scored",
            "agree": False,
            "outputs": {
                "predicted_class": 2,
                "predicted_class_name": names[2],
                "probabilities": dict(zip(names, [0.1, 0.2, 0.7], strict=True)),
            },
        },
    ]


@pytest.mark.parametrize("state", ["dropped", "switched_off", "stopped"])
def test_rows_the_shadow_never_scored_say_why_in_every_event(
    manifest: Manifest, state: ResultState
) -> None:
    record = dataclasses.replace(
        captured(manifest, "abc", rows=2), shadow=ShadowResult("1.1.0", state)
    )
    events = [json.loads(line) for line in event_lines(record)]
    assert [e["data"]["shadow"] for e in events] == [{"version": "1.1.0", "state": state}] * 2


def test_without_a_shadow_an_event_has_no_shadow_field(manifest: Manifest) -> None:
    (line,) = event_lines(captured(manifest))
    assert "shadow" not in json.loads(line)["data"]


def test_every_row_of_a_request_is_an_event_of_its_own(manifest: Manifest) -> None:
    lines = event_lines(captured(manifest, "abc", rows=3))
    events = [json.loads(line) for line in lines]
    assert [e["id"] for e in events] == ["abc/0", "abc/1", "abc/2"]
    assert [e["data"]["row"] for e in events] == [0, 1, 2]


def test_a_missing_value_is_written_as_null(manifest: Manifest) -> None:
    record = Captured(
        "m", "/predict", 0.0, manifest, (float("nan"), 3.5, 1.4, 0.2), [0.2, 0.3, 0.5]
    )
    (line,) = event_lines(record)
    event = json.loads(line)
    assert event["data"]["inputs"]["sepal_length"] is None
    assert event["data"]["outputs"]["predicted_class"] == 2


def test_drops_reach_the_shared_counter() -> None:
    from service.capture.hook import drop_counter
    from service.metrics.instruments import PAYLOAD_LOG_DROPPED

    before = PAYLOAD_LOG_DROPPED._value.get()
    drop_counter()(3)
    assert PAYLOAD_LOG_DROPPED._value.get() == before + 3


def test_a_request_the_events_cannot_describe_is_lost_alone(
    tmp_path: Path, manifest: Manifest
) -> None:
    counted: list[int] = []
    writer = PayloadWriter(RotatingFiles(tmp_path, max_bytes=1 << 20, keep_files=1), counted.append)
    writer.submit(captured(manifest, "before"))
    writer.submit(Captured("odd", "/predict", 0.0, manifest, (1.0, 2.0), [0.2, 0.3, 0.5]))
    writer.submit(captured(manifest, "after"))
    writer.start()
    writer.close()
    writer.submit(captured(manifest, "next"))  # the loss is reported from the request path
    lines = b"".join(f.path.read_bytes() for f in log_files(tmp_path)).splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["before", "after"]
    assert counted == [1]
