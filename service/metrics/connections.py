"""Connections a worker closed to protect itself (service.server): imported
on the first such close, so a worker that never closes one loads nothing."""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter

ClosedReason = Literal[
    # The worker held its connection cap and none was idle: the new one, at once.
    "over_limit",
    # The worker held its cap: its longest-idle connection, to admit a new one.
    "idle_evicted",
    # A request head larger than MAX_REQUEST_HEAD_BYTES (answered 431).
    "head_too_large",
    # No request head within REQUEST_HEAD_TIMEOUT (408 when part of one came).
    "head_timeout",
    # The request body short of its length after REQUEST_BODY_TIMEOUT (408).
    "body_timeout",
]

CONNECTIONS_CLOSED = Counter(
    "ml_api_connections_closed_total",
    "Client connections a worker closed to protect itself, by reason.",
    ["reason"],
    registry=None,
)


def count_closed(reason: ClosedReason) -> None:
    CONNECTIONS_CLOSED.labels(reason).inc()
