"""docker/first_error.py: the first error line of a container's log, which
`make up` prints for a container that failed to start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "first_error.py"
REASON = (
    "model rollout refused (start), still serving nothing: model bundle refused: "
    "/app/artifacts/iris/1.1.0: checksum mismatch: model.joblib has sha256 d121, manifest says 1cb1"
)


def first_error(log: str) -> tuple[int, str]:
    # As make up runs it: the host's python, the log on stdin.
    done = subprocess.run(
        [sys.executable, "-I", str(SCRIPT)], input=log, capture_output=True, text=True, check=False
    )
    return done.returncode, done.stdout.strip()


@pytest.mark.parametrize(
    "log",
    [
        # Gunicorn's own lines (the master refusing the bundle at start).
        "[2026-12-04 05:30:07 +0000] [7] [INFO] Starting gunicorn 27.0.1\n"
        f"[2026-12-04 05:30:08 +0000] [7] [ERROR] {REASON}\n"
        "[2026-12-04 05:30:08 +0000] [7] [ERROR] Reason: App failed to load.\n",
        # The service's JSON lines, with a docker compose logs prefix.
        'api-1  | {"level": "INFO", "message": "listening"}\n'
        f'api-1  | {{"level": "CRITICAL", "message": "{REASON}"}}\n',
    ],
)
def test_the_first_error_line_is_the_reason(log: str) -> None:
    assert first_error(log) == (0, REASON)


def test_a_traceback_gives_its_exception_line() -> None:
    log = (
        "Traceback (most recent call last):\n"
        '  File "/app/service/settings.py", line 3, in <module>\n'
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ServerSettings\n"
    )
    assert first_error(log) == (
        0,
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ServerSettings",
    )


def test_a_log_without_an_error_says_nothing() -> None:
    log = (
        "[2026-12-04 05:30:07 +0000] [7] [INFO] Starting gunicorn 27.0.1\n"
        '{"level": "WARNING", "message": "connection ledger unusable"}\n'
        "not json {\n"
    )
    assert first_error(log) == (1, "")
