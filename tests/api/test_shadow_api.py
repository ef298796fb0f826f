"""The shadow as a client sees it: answers unchanged, /model-info and V2
metadata naming the candidate and its agreement so far."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA, VIRGINICA
from tests.support.shadow import identical_shadow_pin, shadow_after


@pytest.mark.parametrize(
    ("metrics_enabled", "counted_over"), [(True, "all_workers"), (False, "this_worker")]
)
def test_an_identical_shadow_leaves_answers_alone_and_reports_full_agreement(
    make_client: ClientFactory, model_dir: Path, metrics_enabled: bool, counted_over: str
) -> None:
    # A version of its own per case: the test process's metric files are shared.
    version = "1.0.7" if metrics_enabled else "1.0.8"
    pin = identical_shadow_pin(model_dir, version)
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
