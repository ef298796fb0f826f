"""Shadow candidates for tests: an identical copy pinned as the master would pin
it, a retrained one that picks other classes on some rows, rows to send them,
and what a candidate answers offline."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from service.backends.onnx import OnnxBackend
from service.bundle import verify_bundle
from service.settings import PinnedBundle
from tests.support.bundles import copy_bundle, train_bundle

# A small forest on half the data: it disagrees with the default bundle on
# some rows of the training range.
RETRAINED = (
    "--random-state",
    "7",
    "--test-size",
    "0.5",
    "--n-estimators",
    "3",
    "--max-depth",
    "2",
    "--min-accuracy",
    "0.5",
)


def train_retrained(work: Path, version: str) -> Path:
    return train_bundle(work, "--version", version, *RETRAINED)


def shadow_pin(bundle: Path) -> PinnedBundle:
    """The pin the master leaves its workers for a candidate it proved."""
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    return PinnedBundle(path=bundle, version=bundle.name, manifest_sha256=digest)


def identical_shadow_pin(model_dir: Path, version: str) -> PinnedBundle:
    return shadow_pin(copy_bundle(model_dir / "iris" / "1.0.0", model_dir, version=version))


def shadow_after(client: TestClient, rows: int) -> dict[str, Any]:
    """/model-info's shadow once it has scored `rows` rows (or after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        shadow: dict[str, Any] = client.get("/model-info").json()["shadow"]
        counted = shadow["rows"]["agree"] + shadow["rows"]["disagree"]
        if counted >= rows or time.monotonic() > deadline:
            return shadow
        time.sleep(0.02)


def random_rows(bundle: Path, count: int, seed: int) -> list[dict[str, float]]:
    """Rows across the training range of every feature, as a client would send them."""
    manifest = verify_bundle(bundle).manifest
    rng = np.random.default_rng(seed)
    rows: list[dict[str, float]] = [{} for _ in range(count)]
    for feature in manifest.features:
        low, high = getattr(feature, "training_min", None), getattr(feature, "training_max", None)
        assert low is not None
        assert high is not None
        for row, value in zip(rows, rng.uniform(low, high, count).round(2), strict=True):
            row[feature.name] = float(value)
    return rows


def classes_offline(bundle: Path, rows: list[dict[str, float]]) -> list[int]:
    """The class the bundle's ONNX model picks for each row."""
    verified = verify_bundle(bundle)
    backend = OnnxBackend(verified.files["model.onnx"], verified.manifest)
    names = verified.manifest.feature_names
    matrix = np.array([[row[name] for name in names] for row in rows], dtype=np.float64)
    picked: list[int] = np.asarray(backend.predict(matrix)).argmax(axis=1).tolist()
    return picked


def disagreements_offline(served: Path, candidate: Path, rows: list[dict[str, float]]) -> int:
    """The rows where the two bundles' ONNX models pick different classes."""
    pairs = zip(classes_offline(served, rows), classes_offline(candidate, rows), strict=True)
    return sum(served_class != candidate_class for served_class, candidate_class in pairs)
