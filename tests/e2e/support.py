"""Helpers of the end-to-end tier (shared by conftest.py and the tests)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"
PROJECT = os.environ.get("E2E_PROJECT", "ml-api-e2e")
MODEL_VERSION = os.environ.get("MODEL_VERSION", "1.0.0")
IMAGE = f"{os.environ.get('IMAGE_NAME', 'ml-api')}:{MODEL_VERSION}"
# Not the default stack's subnet, so `make up` and `make e2e` can coexist.
BACKEND_SUBNET = os.environ.get("E2E_BACKEND_SUBNET", "172.29.88.0/24")
# The stack's API keys secret: no keys, and AUTH=off, unless a test adds keys
# (with AUTH=keys), which it revokes again. Per-key limits low enough to reach
# in a few requests (only requests with a key meet them).
API_KEYS_FILE = Path(os.environ.get("E2E_API_KEYS_FILE", f"/tmp/{PROJECT}-api-keys"))
E2E_KEY_BURST = 3
API_KEY_SETTINGS = {
    "API_KEYS_FILE": str(API_KEYS_FILE),
    # Open, as the tests that send no key need; test_api_keys_stack recreates
    # the api and the proxy with AUTH=keys for its own tests.
    "AUTH": "off",
    # Which replica answered: the tests count replicas by it.
    "PROXY_UPSTREAM_ADDR_HEADER": "on",
    "PROXY_API_KEY_RATE": "1r/m",
    "PROXY_API_KEY_BURST": str(E2E_KEY_BURST),
}

# The proxy is always Debian's nginx (it needs the Lua module): compose builds
# it on the Python base when NGINX_IMAGE does not name an image.
OFFICIAL = {
    "PYTHON_BASE_IMAGE": "python:3.12-slim-bookworm",
    "PROMETHEUS_IMAGE": "prom/prometheus:v3.5.0",
    "ALERTMANAGER_IMAGE": "prom/alertmanager:v0.28.1",
}
OFFLINE = {
    "PYTHON_BASE_IMAGE": "ml-api/python:offline",
    "NGINX_IMAGE": "ml-api/nginx:offline",
    "PROMETHEUS_IMAGE": "ml-api/prometheus:offline",
    "ALERTMANAGER_IMAGE": "ml-api/alertmanager:offline",
}

# The webhook the shipped docker/alertmanager/alertmanager.yml sends to
# (alert-webhook:9095), which both stacks' tests run beside Alertmanager.
ALERT_RECEIVER = ROOT / "tests" / "e2e" / "alert_receiver.py"

SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}

TIMINGS: dict[str, float | str] = {}


def run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 600,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command, bounded in time; on failure show its output."""
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=capture,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def wait_for(what: str, check: Any, timeout: float = 90, interval: float = 1.0) -> Any:
    """Until check() returns something true (returned); else fail with its last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def notifications(receiver_log: str) -> list[dict[str, Any]]:
    """What the alert receiver (alert_receiver.py) got: one JSON body per line of its log."""
    return [json.loads(line) for line in receiver_log.splitlines() if line.startswith("{")]


def assert_paged_once(receiver_log: Callable[[], str], alertname: str) -> float:
    """The receiver gets one notification, for `alertname`, firing, and no
    other within a group wait (the shipped Alertmanager settings: 30 s).
    Returns the seconds until the first one arrived."""
    t0 = time.monotonic()
    wait_for(f"a page for {alertname}", lambda: notifications(receiver_log()), timeout=300)
    arrived = time.monotonic() - t0
    # A second group or a duplicate would arrive within a group wait.
    time.sleep(35)
    received = notifications(receiver_log())
    assert [n["groupLabels"]["alertname"] for n in received] == [alertname], received
    assert received[0]["status"] == "firing"
    assert received[0]["receiver"] == "on-call"
    return arrived


def engine_up() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api_container(image: str, *options: str) -> tuple[str, str]:
    """`docker run -d` the image as production runs it (read-only root, tmpfs
    for /tmp and the metrics directory) on a free loopback port; returns the
    container id and the API's base URL."""
    port = free_port()
    cid = run(
        [
            "docker",
            "run",
            "-d",
            "--rm",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            "/run/ml-api-metrics:uid=10001,gid=10001,mode=0700",
            *options,
            "-p",
            f"127.0.0.1:{port}:8000",
            image,
        ]
    ).stdout.strip()
    return cid, f"http://127.0.0.1:{port}"


def wait_ready(cid: str, url: str, timeout: float = 60) -> None:
    """Until /health/ready answers 200; else fail with the container's logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http("GET", f"{url}/health/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    logs = run(["docker", "logs", cid], check=False)
    raise AssertionError(f"{cid[:12]} not ready within {timeout:.0f} s\n{logs.stdout}{logs.stderr}")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> Response:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(
                resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
            )
    except urllib.error.HTTPError as err:
        return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


@dataclass
class Stack:
    env: dict[str, str]
    proxy: str
    prometheus: str
    first_prediction_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def compose(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return run(
            ["docker", "compose", "-p", PROJECT, *args], env=self.env, check=check, timeout=timeout
        )

    def containers(self, service: str, *, running_only: bool = True) -> list[str]:
        args = ["ps", "-q"] if running_only else ["ps", "-a", "-q"]
        out = self.compose(*args, service).stdout.split()
        return sorted(out)

    def inspect(self, container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(run(["docker", "inspect", container]).stdout)
        return data[0]

    def ip(self, container: str) -> str:
        nets = self.inspect(container)["NetworkSettings"]["Networks"]
        return str(nets[f"{PROJECT}_backend"]["IPAddress"])

    def predict(self, body: dict[str, Any] | None = None, **kw: Any) -> Response:
        return http("POST", f"{self.proxy}/predict", body or SETOSA, **kw)


class LoadStream:
    """A steady stream of predictions through the proxy, from a few threads.

    `threads` clients open a connection per request; `kept` more keep their
    connections in a pool (httpx), as real clients do. Every request is
    recorded with its start and end (monotonic), its status and the model
    version that answered; anything but a 200 carrying a prediction,
    including a connection error, is a failure.
    """

    def __init__(
        self,
        proxy: str,
        threads: int = 3,
        pause: float = 0.05,
        headers: dict[str, str] | None = None,
        kept: int = 0,
    ) -> None:
        self.proxy = proxy
        self.pause = pause
        self.headers = headers or {}
        self.results: list[tuple[float, float, int, str]] = []
        self.failures: list[str] = []
        # Requests sent and failed by client kind: "new" connection or "kept".
        self.sent: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(threads)]
        self._threads += [
            threading.Thread(target=self._client, args=(True,), daemon=True) for _ in range(kept)
        ]

    def _client(self, keep_alive: bool = False) -> None:
        pool = httpx.Client(headers=self.headers, timeout=15) if keep_alive else None
        try:
            self._send(pool)
        finally:
            if pool is not None:
                pool.close()

    def _post(self, pool: httpx.Client | None) -> Response:
        if pool is None:
            return http("POST", f"{self.proxy}/predict", SETOSA, headers=self.headers, timeout=15)
        # Never resent: a POST whose kept connection the proxy closes without
        # notice is a failure, as it is for a real client (an nginx reload
        # closed its old workers' idle connections so, issue 21 finding 4).
        answer = pool.post(f"{self.proxy}/predict", json=SETOSA)
        return Response(answer.status_code, dict(answer.headers), answer.content)

    def _send(self, pool: httpx.Client | None) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                resp = self._post(pool)
                body = resp.json() if resp.status == 200 else {}
                version = str(body.get("model_version", ""))
                ok = resp.status == 200 and body.get("predicted_class_name") == "setosa"
                failure = "" if ok else f"{resp.status} {resp.body[:200]!r}"
                status = resp.status
            except Exception as exc:
                version, failure, status = "", repr(exc), 0
            kind = "new" if pool is None else "kept"
            with self._lock:
                self.results.append((start, time.monotonic(), status, version))
                self.sent[kind] += 1
                if failure:
                    self.failures.append(failure)
                    self.failed[kind] += 1
            time.sleep(self.pause)

    def __enter__(self) -> LoadStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def sent_total(self) -> int:
        with self._lock:
            return len(self.results)

    def versions_since(self, t: float) -> set[str]:
        with self._lock:
            return {version for start, _, _, version in self.results if start >= t}

    def answered_between(self, t0: float, t1: float) -> list[str]:
        """The versions that answered the requests sent and answered within [t0, t1]."""
        with self._lock:
            return [v for start, end, _, v in self.results if start >= t0 and end <= t1]
