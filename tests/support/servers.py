"""Real servers for process tests: Gunicorn with Uvicorn workers on 127.0.0.1.

Every server is started in its own session and stopped by its pid; the
context managers stop them even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.bundles import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Any, timeout: float, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}")


@dataclass
class Gunicorn:
    process: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def access_log(self) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.stdout().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "ml_api.access"]

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return {int(pid) for pid in out.stdout.split()}

    def loaded_count(self) -> int:
        return self.stderr().count('"msg":"model loaded"')

    def accepting_count(self) -> int:
        """Workers past their start, taking connections (service.server.worker)."""
        return self.stderr().count('"msg":"accepting connections"')

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 30) -> int | None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return self.process.returncode


def start_gunicorn(
    model_dir: Path, log_dir: Path, *, workers: int = 2, env: dict[str, str] | None = None
) -> Gunicorn:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = log_dir / "gunicorn.out", log_dir / "gunicorn.err"
    full_env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": str(workers),
        "PROMETHEUS_MULTIPROC_DIR": str(log_dir / "metrics"),
        # Open unless the test gives a keys file: a developer's secrets/ stays out.
        "API_KEYS_FILE": str(log_dir / "no-api-keys"),
        **({} if env and "API_KEYS_FILE" in env else {"AUTH": "off"}),
        **(env or {}),
    }
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    return Gunicorn(process, port, stdout_path, stderr_path)


@contextmanager
def running_gunicorn(
    model_dir: Path,
    log_dir: Path,
    *,
    workers: int = 2,
    env: dict[str, str] | None = None,
    ready_timeout: float = 60,
) -> Iterator[Gunicorn]:
    """A Gunicorn whose every worker has loaded the model."""
    server = start_gunicorn(model_dir, log_dir, workers=workers, env=env)
    try:

        def all_loaded() -> bool:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited {server.process.returncode}:\n{server.stderr()}"
                )
            # Every worker accepting, not only loaded: one still finishing its
            # start would leave a sibling every connection of a burst.
            return (
                server.loaded_count() >= workers
                and server.accepting_count() >= workers
                and ready(server.url)
            )

        wait_for(all_loaded, ready_timeout, what="all workers to load the model")
        yield server
    finally:
        server.stop()


@contextmanager
def two_open_gunicorns(
    model_dir: Path, work: Path, names: tuple[str, str]
) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    """Two one-worker Gunicorns with AUTH=off, logging under work/<name>: the
    upstreams of a proxy test."""
    env = {"AUTH": "off"}
    with (
        running_gunicorn(model_dir, work / names[0], workers=1, env=env) as first,
        running_gunicorn(model_dir, work / names[1], workers=1, env=env) as second,
    ):
        yield first, second


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
