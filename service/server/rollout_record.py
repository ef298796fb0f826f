"""What the Gunicorn master decided about rollouts, for the workers to report.

The master writes one small JSON file into the multiprocess metrics directory
(emptied when the server starts, so the counts are this server's); every
worker reads it for `/model-info` and `model_rollouts_total` on `/metrics`.
The master never imports prometheus_client: its counts reach Prometheus
through whichever worker answers the scrape.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

STATE_FILE = "rollouts.json"
Result = Literal["accepted", "refused"]
RESULTS: tuple[Result, ...] = ("accepted", "refused")
Trigger = Literal["start", "sighup", "promote"]


class RolloutAttempt(BaseModel):
    model_config = ConfigDict(frozen=True)

    trigger: Trigger
    version: str | None
    path: str | None
    result: Result
    reason: str | None
    time: datetime


class ShadowDecision(BaseModel):
    """The master's last decision about the shadow: a candidate accepted (being
    scored from then on) or refused (the shadow before it stays), or the
    shadow switched off (`off`: by the operator, a promotion or a new served
    version it cannot shadow)."""

    model_config = ConfigDict(frozen=True)

    trigger: Trigger
    version: str | None
    path: str | None
    result: Literal["accepted", "refused", "off"]
    reason: str | None
    # The shadow pinned after this decision (None: no shadow is scored).
    shadowing: str | None
    time: datetime


class RolloutRecord(BaseModel):
    counts: dict[Result, int] = {"accepted": 0, "refused": 0}
    last: RolloutAttempt | None = None
    serving: RolloutAttempt | None = None
    shadow: ShadowDecision | None = None


def now() -> datetime:
    return datetime.now(UTC)


def read_record(directory: Path | None) -> RolloutRecord | None:
    if directory is None:
        return None
    try:
        return RolloutRecord.model_validate_json((directory / STATE_FILE).read_bytes())
    except (OSError, ValidationError):
        return None


def record_attempt(directory: Path, attempt: RolloutAttempt) -> RolloutRecord:
    record = read_record(directory) or RolloutRecord()
    counts = dict(record.counts)
    counts[attempt.result] = counts.get(attempt.result, 0) + 1
    serving = attempt if attempt.result == "accepted" else record.serving
    return _write(
        directory,
        RolloutRecord(counts=counts, last=attempt, serving=serving, shadow=record.shadow),
    )


def record_shadow(directory: Path, decision: ShadowDecision) -> RolloutRecord:
    record = read_record(directory) or RolloutRecord()
    return _write(directory, record.model_copy(update={"shadow": decision}))


def _write(directory: Path, record: RolloutRecord) -> RolloutRecord:
    # Written whole and renamed: a reader sees the old record or the new one.
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".rollouts-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(record.model_dump_json().encode())
    os.replace(temporary, directory / STATE_FILE)
    return record
