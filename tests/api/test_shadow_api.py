"""The shadow as a client sees it: answers unchanged, /model-info and V2
metadata naming the candidate and its agreement so far."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import PinnedBundle
from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA, VIRGINICA, copy_bundle


def shadow_pin(model_dir: Path, version: str) -> PinnedBundle:
    bundle = copy_bundle(model_dir / "iris" / "1.0.0", model_dir, version=version)
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    return PinnedBundle(path=bundle, version=version, manifest_sha256=digest)


def shadow_after(client: TestClient, rows: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        shadow: dict[str, Any] = client.get("/model-info").json()["shadow"]
        counted = shadow["rows"]["agree"] + shadow["rows"]["disagree"]
        if counted >= rows or time.monotonic() > deadline:
            return shadow
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("metrics_enabled", "counted_over"), [(True, "all_workers"), (False, "this_worker")]
)
def test_an_identical_shadow_leaves_answers_alone_and_reports_full_agreement(
    make_client: ClientFactory, model_dir: Path, metrics_enabled: bool, counted_over: str
) -> None:
    # A version of its own per case: the test process's metric files are shared.
    version = "1.0.7" if metrics_enabled else "1.0.8"
    pin = shadow_pin(model_dir, version)
    settings = {"model_version": "1.0.0", "metrics_enabled": metrics_enabled}
    with make_client(shadow_bundle=pin, **settings) as client:
        single = client.post("/predict", json=SETOSA)
        batch = client.post("/predict/batch", json={"instances": [SETOSA, VIRGINICA]})
        shadow = shadow_after(client, 3)
        metadata = client.get("/v2/models/iris").json()
    assert single.json()["model_version"] == "1.0.0"
    assert batch.json()["model_version"] == "1.0.0"
    assert shadow["version"] == version
    assert shadow["state"] == "scoring"
    assert shadow["rows"] == {"agree": 3, "disagree": 0, "dropped": 0}
    assert shadow["agreement"] == 1.0
    assert shadow["counted_over"] == counted_over
    assert metadata["shadow"]["version"] == version
    assert metadata["versions"] == ["1.0.0"]


def test_without_a_shadow_model_info_and_metadata_say_none(onnx_client: TestClient) -> None:
    assert onnx_client.get("/model-info").json()["shadow"] is None
    assert "shadow" not in onnx_client.get("/v2/models/iris").json()
