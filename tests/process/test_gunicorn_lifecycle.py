"""Real Gunicorn with two real Uvicorn workers on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.bundles import SETOSA, Detonator, copy_bundle, rewrite_file, trusting
from tests.support.servers import Gunicorn, running_gunicorn, start_gunicorn, wait_for

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


# No keep-alive: a new connection each time, so the kernel spreads them over the workers.
_NO_KEEPALIVE = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


def _fresh_connection_post(url: str, body: object) -> httpx.Response:
    return _NO_KEEPALIVE.post(f"{url}/predict", json=body)


def _read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _predictions_logged(server: Gunicorn) -> list[dict[str, Any]]:
    return [line for line in server.access_log() if line["path"] == "/predict"]


def test_both_workers_answer_predictions(model_dir: Path, tmp_path: Path) -> None:
    # Connections opened together, as a client's pool opens them: the workers'
    # acceptor splits them. (Opened one after another, each closed before the
    # next, they go to whichever worker the kernel wakes first, maybe always one.)
    with running_gunicorn(model_dir, tmp_path / "logs", workers=2) as server:
        workers = server.worker_pids()
        assert len(workers) == 2
        pool = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(8)]
        for connection in pool:
            connection.connect()
        answers: list[tuple[int, Any]] = []
        for _ in range(15):
            for connection in pool:
                connection.request(
                    "POST", "/predict", json.dumps(SETOSA), {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                answers.append((response.status, json.loads(response.read())))
        for connection in pool:
            connection.close()
        assert {status for status, _ in answers} == {200}
        assert {answer["predicted_class_name"] for _, answer in answers} == {"setosa"}
        wait_for(lambda: len(_predictions_logged(server)) >= 120, 5, what="access log lines")
        answered_by = {line["worker_pid"] for line in _predictions_logged(server)}
    assert answered_by == workers


def test_access_log_is_one_json_line_per_request_on_stdout(model_dir: Path, tmp_path: Path) -> None:
    with running_gunicorn(model_dir, tmp_path / "logs", workers=1) as server:
        with httpx.Client(base_url=server.url) as client:
            ok = client.post("/predict", json=SETOSA, headers={"x-request-id": "trace-1"})
            bad = client.post("/predict", json={})
            client.get("/health")
        wait_for(lambda: len(server.access_log()) >= 4, 5, what="access log lines")
        # The readiness probe that started the test is logged too.
        lines = [line for line in server.access_log() if line["path"] != "/health/ready"]
        assert "Booting worker" in server.stderr()
        assert "Booting worker" not in server.stdout()
    assert (ok.status_code, bad.status_code) == (200, 422)
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("POST", "/predict", 200),
        ("POST", "/predict", 422),
        ("GET", "/health", 200),
    ]
    assert lines[0]["request_id"] == "trace-1"
    assert lines[1]["request_id"] == bad.headers["x-request-id"]
    for line in lines:
        assert line["duration_ms"] >= 0
        assert isinstance(line["worker_pid"], int)


def test_sigterm_drains_an_in_flight_request_and_exits_zero(
    model_dir: Path, tmp_path: Path
) -> None:
    body = b'{"sepal_length":5.1,"sepal_width":3.5,"petal_length":1.4,"petal_width":0.2}'
    with running_gunicorn(model_dir, tmp_path / "logs", workers=1) as server:
        # An in-flight request: headers and half the body sent, the rest after SIGTERM.
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:20]
        )
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None, "gunicorn quit with a request in flight"
        sock.sendall(body[20:])
        response = _read_until_closed(sock)
        sock.close()
        assert server.wait(timeout=30) == 0
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b'"predicted_class_name":"setosa"' in response


_SETOSA_BODY = json.dumps(SETOSA, separators=(",", ":")).encode()
_PREDICT_REQUEST = (
    b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(_SETOSA_BODY)}\r\n\r\n".encode()
    + _SETOSA_BODY
)


def _answer_in_a_drain(server: Gunicorn, sock: socket.socket) -> bytes:
    """Send a prediction on `sock` a second into a SIGTERM drain: it must be
    answered with `Connection: close`, and Gunicorn must then exit 0."""
    server.signal(signal.SIGTERM)
    time.sleep(1.0)
    sock.sendall(_PREDICT_REQUEST)
    response = _read_until_closed(sock)
    sock.close()
    assert server.wait(timeout=30) == 0
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert b'"predicted_class_name":"setosa"' in body
    return head


def test_a_connection_whose_request_comes_late_in_a_drain_is_answered_then_closed(
    model_dir: Path, tmp_path: Path
) -> None:
    # A client that connected just before SIGTERM (or a max_requests recycle)
    # and sends a moment later: uvicorn alone would close it unanswered.
    with running_gunicorn(model_dir, tmp_path / "logs", workers=1) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        time.sleep(0.3)
        _answer_in_a_drain(server, sock)


def test_an_idle_keep_alive_connection_used_again_in_a_drain_is_answered_then_closed(
    model_dir: Path, tmp_path: Path
) -> None:
    with running_gunicorn(model_dir, tmp_path / "logs", workers=1) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(_PREDICT_REQUEST)
        first = b""
        while not first.endswith(b"}"):
            first += sock.recv(65536)
        # Within the keep-alive timeout the connection is still the client's to use.
        _answer_in_a_drain(server, sock)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" not in first.lower()


def test_sighup_rolls_out_a_new_version_without_a_failed_request(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    failures: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def traffic(url: str) -> None:
        while not stop.is_set():
            try:
                response = _fresh_connection_post(url, SETOSA)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                else:
                    versions.append(response.json()["model_version"])
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    with running_gunicorn(model_dir, tmp_path / "logs", workers=2) as server:
        sender = threading.Thread(target=traffic, args=(server.url,))
        sender.start()
        try:
            wait_for(lambda: len(versions) > 20, 10, what="traffic on 1.0.0")
            # Copy under a name the service ignores, then rename: the new
            # version appears complete or not at all.
            staging = copy_bundle(bundle_path, model_dir, version="1.1.0")
            staging.rename(model_dir / "iris" / ".incoming")
            (model_dir / "iris" / ".incoming").rename(model_dir / "iris" / "1.1.0")
            old_workers = server.worker_pids()
            server.signal(signal.SIGHUP)
            wait_for(lambda: versions[-30:] == ["1.1.0"] * 30, 30, what="1.1.0 everywhere")
            # Old workers drain and exit while the new ones already serve.
            wait_for(
                lambda: (
                    server.worker_pids().isdisjoint(old_workers) and len(server.worker_pids()) == 2
                ),
                30,
                what="the old workers to exit",
            )
            new_workers = server.worker_pids()
        finally:
            stop.set()
            sender.join()
    assert failures == []
    assert versions[0] == "1.0.0"
    assert old_workers.isdisjoint(new_workers)
    assert len(new_workers) == 2


def test_missing_bundle_makes_gunicorn_exit_nonzero_with_the_reason(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    server = start_gunicorn(empty, tmp_path / "logs", workers=2)
    try:
        code = server.wait(timeout=60)
    finally:
        server.stop()
    assert code != 0
    assert f"model bundle refused: {empty / 'iris'}: missing" in server.stderr()


def test_tampered_bundle_makes_gunicorn_exit_nonzero_without_unpickling(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    (bundle_path / "model.joblib").write_bytes(pickle.dumps(Detonator(marker)))
    server = start_gunicorn(model_dir, tmp_path / "logs", workers=2, env={"BACKEND": "sklearn"})
    try:
        code = server.wait(timeout=60)
    finally:
        server.stop()
    assert code != 0
    assert (
        f"model bundle refused: {bundle_path}: checksum mismatch: model.joblib" in server.stderr()
    )
    assert not marker.exists()


def test_a_refused_start_s_first_error_line_is_the_reason_make_up_prints(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    # docker/compose-up.sh pipes a failed container's log through
    # docker/first_error.py: the reason, not only "container exited (1)".
    (bundle_path / "model.joblib").write_bytes(b"not the model the manifest names")
    server = start_gunicorn(model_dir, tmp_path / "logs", workers=1, env={"BACKEND": "sklearn"})
    try:
        assert server.wait(timeout=60) != 0
    finally:
        server.stop()
    done = subprocess.run(
        [sys.executable, "-I", str(REPO / "docker" / "first_error.py")],
        input=server.stderr(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith(
        "model rollout refused (start), still serving nothing: model bundle refused: "
        f"{bundle_path}: checksum mismatch: model.joblib has sha256 "
    )
    assert done.stdout.count("\n") == 1


def test_a_malicious_pickle_with_a_recomputed_manifest_never_runs_under_gunicorn(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    """Neither at start nor on SIGHUP: not in the master, its trial, or a worker."""
    marker = tmp_path / "unpickled"

    def malicious(bundle: Path) -> None:
        rewrite_file(bundle, "model.joblib", pickle.dumps(Detonator(marker)), update_checksum=True)
        manifest_path = bundle / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["backend"] = "sklearn"
        manifest_path.write_text(json.dumps(manifest))

    with running_gunicorn(model_dir, tmp_path / "logs", workers=2) as server:
        malicious(copy_bundle(bundle_path, model_dir, version="1.1.0"))
        old_workers = server.worker_pids()
        server.signal(signal.SIGHUP)
        wait_for(
            lambda: server.worker_pids().isdisjoint(old_workers) and server.loaded_count() >= 4,
            60,
            what="new workers",
        )
        answer = _fresh_connection_post(server.url, SETOSA).json()
        assert server.process.poll() is None
    assert answer["model_version"] == "1.0.0"
    assert "untrusted: model.joblib has sha256" in server.stderr()
    assert not marker.exists()

    # At start, with only the malicious bundle: refused with one line, never run.
    shutil.rmtree(bundle_path)
    server = start_gunicorn(model_dir, tmp_path / "logs-start", workers=2)
    try:
        code = server.wait(timeout=60)
    finally:
        server.stop()
    assert code != 0
    assert "model rollout refused (start), still serving nothing" in server.stderr()
    assert "untrusted: model.joblib" in server.stderr()
    assert not marker.exists()


def test_oversized_chunked_body_is_refused_before_it_is_all_sent(
    model_dir: Path, tmp_path: Path
) -> None:
    with running_gunicorn(
        model_dir, tmp_path / "logs", workers=1, env={"MAX_REQUEST_BYTES": "4096"}
    ) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(
            b"POST /predict/batch HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 8192
        sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        # The rest of the body is never sent: the answer must come anyway.
        response = _read_until_closed(sock)
        sock.close()
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"4096" in response


def test_sklearn_backend_serves_under_gunicorn(model_dir: Path, tmp_path: Path) -> None:
    with running_gunicorn(
        model_dir,
        tmp_path / "logs",
        workers=2,
        env={"BACKEND": "sklearn", **trusting(model_dir / "iris" / "1.0.0")},
    ) as server:
        info = httpx.get(f"{server.url}/model-info").json()
        answer = _fresh_connection_post(server.url, SETOSA).json()
    assert info["backend"] == "sklearn"
    assert answer["predicted_class_name"] == "setosa"
    shutil.rmtree(tmp_path / "logs")


def test_sighup_with_a_tampered_new_bundle_keeps_serving_the_old_one(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    failures: list[str] = []
    with running_gunicorn(model_dir, tmp_path / "logs", workers=2) as server:
        bad = copy_bundle(bundle_path, model_dir, version="1.1.0")
        (bad / "model.onnx").write_bytes(b"tampered")
        old_workers = server.worker_pids()
        server.signal(signal.SIGHUP)
        wait_for(
            lambda: (
                server.worker_pids().isdisjoint(old_workers)
                and len(server.worker_pids()) == 2
                and server.loaded_count() >= 4
            ),
            30,
            what="new workers",
        )
        for _ in range(20):
            response = _fresh_connection_post(server.url, SETOSA)
            if response.status_code != 200 or response.json()["model_version"] != "1.0.0":
                failures.append(response.text)
        assert "model rollout refused (sighup), still serving 1.0.0" in server.stderr()
        assert "checksum mismatch: model.onnx" in server.stderr()
        # A good version rolls out on the next SIGHUP: the hold is not sticky.
        shutil.rmtree(bad)
        copy_bundle(bundle_path, model_dir, version="1.2.0")
        server.signal(signal.SIGHUP)
        wait_for(
            lambda: _fresh_connection_post(server.url, SETOSA).json()["model_version"] == "1.2.0",
            30,
            what="1.2.0 to serve",
        )
        assert server.process.poll() is None
    assert failures == []


def test_onnx_workers_never_load_scikit_learn(model_dir: Path, tmp_path: Path) -> None:
    # scikit-learn is ~50 MB per worker and only the sklearn backend needs it.
    with running_gunicorn(model_dir, tmp_path / "logs", workers=2) as server:
        assert _fresh_connection_post(server.url, SETOSA).status_code == 200
        workers = server.worker_pids()
        mapped = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in workers}
    assert len(mapped) == 2
    for pid, maps in mapped.items():
        assert "onnxruntime" in maps, pid
        assert "/sklearn/" not in maps, pid
