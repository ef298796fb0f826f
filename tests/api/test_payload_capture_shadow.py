"""Payload capture with a shadow scored: each row's event carries the
candidate's answer for that row and whether it agreed with the one served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA, VIRGINICA
from tests.support.capture import read_events
from tests.support.shadow import (
    classes_offline,
    disagreements_offline,
    identical_shadow_pin,
    random_rows,
    shadow_after,
    shadow_pin,
    train_retrained,
)
from tests.support.v2 import INFER, ROWS, json_request


def capture_with(make_client: ClientFactory, payloads: Path, **settings: Any) -> Any:
    return make_client(
        model_version="1.0.0", payload_log_dir=payloads, payload_sample=1.0, **settings
    )


def test_an_identical_shadow_s_outputs_in_every_event_are_the_served_answer(
    make_client: ClientFactory, model_dir: Path, tmp_path: Path
) -> None:
    # A version of its own: the test process's metric files are shared.
    pin = identical_shadow_pin(model_dir, "1.0.6")
    payloads = tmp_path / "payloads"
    with capture_with(make_client, payloads, shadow_bundle=pin) as client:
        client.post("/predict", json=SETOSA).raise_for_status()
        client.post("/predict/batch", json={"instances": [SETOSA, VIRGINICA]}).raise_for_status()
        client.post(INFER, json=json_request(ROWS[:1])).raise_for_status()
        client.post(INFER, json=json_request(ROWS)).raise_for_status()
        assert shadow_after(client, 6)["rows"]["agree"] == 6
    events = read_events(payloads)
    assert len(events) == 6
    for event in events:
        data = event["data"]
        assert data["shadow"] == {
            "version": "1.0.6",
            "state": "scored",
            "agree": True,
            "outputs": data["outputs"],
        }


def test_a_retrained_shadow_s_events_disagree_exactly_where_it_does_offline(
    make_client: ClientFactory, model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    candidate = train_retrained(tmp_path / "retrained", "1.2.0")
    rows = random_rows(bundle_path, 60, seed=3)
    expected = disagreements_offline(bundle_path, candidate, rows)
    candidate_classes = classes_offline(candidate, rows)
    payloads = tmp_path / "payloads"
    # The row each event's id names: single requests first, then batches of 20.
    row_of: dict[str, int] = {}
    with capture_with(make_client, payloads, shadow_bundle=shadow_pin(candidate)) as client:
        for index, row in enumerate(rows[:20]):
            response = client.post("/predict", json=row)
            row_of[response.headers["x-request-id"]] = index
        for start in (20, 40):
            batch = {"instances": rows[start : start + 20]}
            response = client.post("/predict/batch", json=batch)
            for offset in range(20):
                row_of[f"{response.headers['x-request-id']}/{offset}"] = start + offset
        shadow = shadow_after(client, len(rows))
    assert expected > 0
    assert shadow["rows"] == {"agree": len(rows) - expected, "disagree": expected, "dropped": 0}
    events = read_events(payloads)
    assert sorted(row_of[event["id"]] for event in events) == list(range(len(rows)))
    disagreeing = 0
    for event in events:
        data = event["data"]
        written = data["shadow"]
        assert (written["version"], written["state"]) == ("1.2.0", "scored")
        assert written["outputs"]["predicted_class"] == candidate_classes[row_of[event["id"]]]
        same = written["outputs"]["predicted_class"] == data["outputs"]["predicted_class"]
        assert written["agree"] is same
        disagreeing += not same
    assert disagreeing == expected
