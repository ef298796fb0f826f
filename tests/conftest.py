"""Shared fixtures. One real Iris bundle is trained per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# pytest-xdist's workers inherit the directory the controller's import of
# service.metrics made: each needs its own, or their values add up.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

# First, before any test module imports prometheus_client: it picks its
# (multiprocess) value storage once, from PROMETHEUS_MULTIPROC_DIR.
import service.metrics  # noqa: F401  isort: skip

from tests.support.bundles import copy_bundle, train_bundle

AMBIENT_SETTINGS = (
    "MODEL_DIR",
    "MODEL_NAME",
    "MODEL_VERSION",
    "BACKEND",
    "MAX_BATCH_SIZE",
    "MAX_REQUEST_BYTES",
    "LOG_LEVEL",
    "WEB_CONCURRENCY",
    "BIND",
    "PORT",
    "TRUSTED_MODEL_SHA256",
    "TRUSTED_DIGESTS_FILE",
    "ML_API_PINNED_BUNDLE",
    "ML_API_SHADOW_BUNDLE",
    "SHADOW_MODEL_VERSION",
    "ROLLOUT_REQUEST_FILE",
    "API_KEYS_FILE",
    "API_KEYS_URL",
    "API_KEYS_POLL_INTERVAL",
    "AUTH",
    "DOCS",
    "PAYLOAD_LOG_DIR",
    "PAYLOAD_SAMPLE",
    "PAYLOAD_LOG_MAX_MB",
    "PAYLOAD_LOG_FILES",
)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """artifacts-like tree holding iris/1.0.0 (ONNX + joblib). Never modify it: copy it."""
    return train_bundle(tmp_path_factory.mktemp("trained"), "--version", "1.0.0")


@pytest.fixture
def model_dir(tmp_path: Path, trained_bundle: Path) -> Path:
    """A private MODEL_DIR with a copy of the trained bundle, free to tamper with."""
    directory = tmp_path / "models"
    copy_bundle(trained_bundle, directory)
    return directory


@pytest.fixture
def bundle_path(model_dir: Path) -> Path:
    return model_dir / "iris" / "1.0.0"


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings come from the environment: a developer's exported MODEL_VERSION
    # or BACKEND must not change what the tests see.
    for name in AMBIENT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
