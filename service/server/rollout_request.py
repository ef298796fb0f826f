"""What `make shadow`, `make shadow-off` and `make promote` ask of a running master.

A SIGHUP alone means "roll out MODEL_VERSION (or the newest version)". These
verbs need more: the request is written, whole, to ROLLOUT_REQUEST_FILE, the
master is sent SIGHUP, and the master takes the request (reading and deleting
it) in its reload hook, acts on it and writes one line of outcome beside it
(`<file>.outcome`), which this CLI prints:

    python -m service.server.rollout_request --request-file F --pid-file P shadow 1.1.0

Exits 0 when the master accepted, 1 when it refused (the line says why), 2
on a usage error or when the master did not answer in time.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from service.manifest import SEMVER_PATTERN, SEMVER_RE

Action = Literal["shadow", "shadow-off", "promote"]


class RolloutRequest(BaseModel):
    id: str = Field(max_length=64)
    action: Action
    version: str | None = Field(default=None, pattern=SEMVER_PATTERN)


class RolloutOutcome(BaseModel):
    id: str
    ok: bool
    message: str


def outcome_file(request_file: Path) -> Path:
    return request_file.with_name(request_file.name + ".outcome")


def _write_whole(path: Path, data: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(data)
    os.replace(temporary, path)


def take_request(request_file: Path | None) -> RolloutRequest | str | None:
    """The request waiting (deleted as it is taken), None when there is none,
    or why the file could not be read as one."""
    if request_file is None:
        return None
    try:
        raw = request_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"rollout request {request_file} unreadable: {exc.strerror}"
    request_file.unlink(missing_ok=True)
    try:
        return RolloutRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        return f"rollout request {request_file} invalid: {first['msg']}"


def answer(request_file: Path, request: RolloutRequest, ok: bool, message: str) -> None:
    outcome = RolloutOutcome(id=request.id, ok=ok, message=message)
    _write_whole(outcome_file(request_file), outcome.model_dump_json())


def _read_outcome(path: Path, request_id: str) -> RolloutOutcome | None:
    try:
        outcome = RolloutOutcome.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None
    return outcome if outcome.id == request_id else None


def send(
    request_file: Path, pid_file: Path, action: Action, version: str | None, timeout: float
) -> int:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        print(f"no running server: {pid_file} names no master (start one with make serve)")
        return 2
    request = RolloutRequest(id=uuid.uuid4().hex, action=action, version=version)
    _write_whole(request_file, request.model_dump_json())
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        request_file.unlink(missing_ok=True)
        print(f"no running server: process {pid} from {pid_file} is gone")
        return 2
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = _read_outcome(outcome_file(request_file), request.id)
        if outcome is not None:
            print(outcome.message)
            return 0 if outcome.ok else 1
        time.sleep(0.1)
    print(f"the master (pid {pid}) did not answer within {timeout:g} s: see its log")
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.server.rollout_request", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--request-file", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("action", choices=["shadow", "shadow-off", "promote"])
    parser.add_argument("version", nargs="?")
    args = parser.parse_args(argv)
    if (args.action == "shadow") != (args.version is not None):
        parser.error("shadow takes a VERSION; shadow-off and promote take none")
    if args.version is not None and not SEMVER_RE.match(args.version):
        parser.error(f"{args.version!r} is not a semantic version")
    return send(args.request_file, args.pid_file, args.action, args.version, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
