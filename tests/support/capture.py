"""An app that captures every request, for tests that read its payload files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.settings import ServiceSettings
from tests.support.bundles import pinned_digests


def capturing_settings(model_dir: Path, payloads: Path, **overrides: Any) -> ServiceSettings:
    """Every request captured into `payloads`; open (no keys file is read)."""
    return ServiceSettings(
        model_dir=model_dir,
        trusted_model_sha256=pinned_digests(model_dir),
        payload_log_dir=payloads,
        payload_sample=1.0,
        auth="off",
        api_keys_file=payloads.parent / "no-api-keys",
        **overrides,
    )


def read_events(directory: Path) -> list[dict[str, Any]]:
    """Every event in the directory's payload files, file by file."""
    lines = []
    for path in sorted(directory.glob("payloads-*.jsonl")):
        lines += path.read_bytes().splitlines()
    return [json.loads(line) for line in lines]
