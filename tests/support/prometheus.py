"""A real Prometheus (and promtool) for process tests, on loopback, stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.servers import wait_for


def binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(path).exists(), f"{name} is missing: run `make system-deps`"
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class PromQLError(Exception):
    pass


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.post(f"{self.url}/api/v1/query", data={"query": expr}, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        assert body["data"]["resultType"] == "vector", body["data"]
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@contextmanager
def _running(command: list[str], url: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Prometheus-family daemon (same /-/ready endpoint), stopped by its pid."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def is_ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{command[0]} exited {process.returncode}:\n{log_path.read_text()}"
                )
            try:
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(is_ready, 30, interval=0.1, what=f"{command[0]} to be ready")
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


@contextmanager
def running_prometheus(config: Path, data_dir: Path, port: int) -> Iterator[Prometheus]:
    url = f"http://127.0.0.1:{port}"
    log_path = config.parent / "prometheus.log"
    command = [
        binary("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with _running(command, url, log_path) as process:
        yield Prometheus(process, url, log_path)


@contextmanager
def running_alertmanager(config: Path, data_dir: Path, port: int) -> Iterator[str]:
    """Alertmanager (Debian's binary name) on loopback; yields its URL."""
    url = f"http://127.0.0.1:{port}"
    command = [
        binary("prometheus-alertmanager"),
        f"--config.file={config}",
        f"--storage.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        # One instance: no gossip port on every interface.
        "--cluster.listen-address=",
    ]
    with _running(command, url, config.parent / "alertmanager.log"):
        yield url


def write_drift_rules(model_dir: Path, output: Path, *args: str, name: str = "iris") -> str:
    """The drift rules of a bundle (iris unless named) under model_dir, by the project
    command's module; returns what it reported on stderr."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.monitoring.rules",
            "--model-dir",
            str(model_dir),
            "--model-name",
            name,
            "--output",
            str(output),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr
