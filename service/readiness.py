"""Whether a worker should be sent traffic: one rule for /health/ready and the
Open Inference Protocol's /v2/health/ready, so a load balancer or an
orchestrator probing either routes around the same workers."""

from __future__ import annotations

from typing import Any

MODEL_NOT_LOADED = "no model loaded yet"


def unready_reason(state: Any) -> str | None:
    """Why this worker is not ready (app.state: its pipeline and key store),
    None when it is: no model loaded yet, or a copy of the API keys that is no
    longer kept current (API_KEYS_URL), where a key revoked since still works."""
    if getattr(state, "pipeline", None) is None:
        return MODEL_NOT_LOADED
    keys = getattr(state, "keys", None)
    return None if keys is None else keys.unfollowed_reason()
