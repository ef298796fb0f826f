"""Shadow scoring under real Gunicorn: a candidate scored in every worker on the
rows the served version answered, never at the client's expense.

The served version is iris 1.0.0 (ONNX) throughout; each test names its
candidate. Counts are read from /metrics, summed over both workers.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.bundles import REPO, copy_bundle, rewrite_file, train_bundle, trusting
from tests.support.capture import read_events
from tests.support.scrape import parse_samples, sample
from tests.support.servers import Gunicorn, running_gunicorn, wait_for
from tests.support.shadow import disagreements_offline, random_rows, train_retrained
from tests.support.shadow_models import Fault, make_faulty
from tests.support.traffic import Traffic

pytestmark = pytest.mark.process

SERVED = {"MODEL_VERSION": "1.0.0"}


def shadow_counts(server: Gunicorn, shadow: str) -> dict[str, float]:
    samples = parse_samples(httpx.get(f"{server.url}/metrics", timeout=10).text)
    labels = {"model": "iris", "version": "1.0.0", "shadow_version": shadow}
    return {
        "agree": sample(samples, "model_shadow_rows_total", result="agree", **labels),
        "disagree": sample(samples, "model_shadow_rows_total", result="disagree", **labels),
        "dropped": sample(samples, "model_shadow_dropped_rows_total", **labels),
        "error": sample(samples, "model_shadow_failures_total", reason="error", **labels),
        "timeout": sample(samples, "model_shadow_failures_total", reason="timeout", **labels),
        "zero_difference": sample(samples, "model_shadow_difference_bucket", le="0.0", **labels),
    }


def send_rows(server: Gunicorn, rows: list[dict[str, float]]) -> None:
    """Half one per /predict request, the rest in /predict/batch requests of 25."""
    half = len(rows) // 2
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for row in rows[:half]:
            client.post("/predict", json=row).raise_for_status()
        for start in range(half, len(rows), 25):
            batch = {"instances": rows[start : start + 25]}
            client.post("/predict/batch", json=batch).raise_for_status()


def scored(server: Gunicorn, shadow: str, rows: int) -> bool:
    counts = shadow_counts(server, shadow)
    return counts["agree"] + counts["disagree"] + counts["dropped"] >= rows


def test_an_identical_candidate_agrees_on_every_row(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    copy_bundle(bundle_path, model_dir, version="1.0.1")
    rows = random_rows(bundle_path, 300, seed=1)
    env = {**SERVED, "SHADOW_MODEL_VERSION": "1.0.1"}
    with running_gunicorn(model_dir, tmp_path / "logs", env=env) as server:
        send_rows(server, rows)
        wait_for(lambda: scored(server, "1.0.1", len(rows)), 30, what="every row scored")
        counts = shadow_counts(server, "1.0.1")
        info = httpx.get(f"{server.url}/model-info").json()
        metadata = httpx.get(f"{server.url}/v2/models/iris").json()
    assert counts["agree"] == len(rows)
    assert counts["disagree"] == counts["dropped"] == 0
    shadow = info["shadow"]
    assert (shadow["version"], shadow["state"], shadow["agreement"]) == ("1.0.1", "scoring", 1.0)
    assert shadow["rows"] == {"agree": len(rows), "disagree": 0, "dropped": 0}
    assert shadow["workers_scoring"] == 2
    assert info["rollout"]["shadow"]["result"] == "accepted"
    assert metadata["shadow"]["version"] == "1.0.1"
    assert metadata["versions"] == ["1.0.0"]
    assert "model shadow accepted (start): iris 1.0.1" in server.stderr()


def test_a_retrained_candidate_disagrees_exactly_where_it_does_offline(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    other = train_retrained(tmp_path / "retrained", "1.1.0")
    candidate = copy_bundle(other, model_dir)
    rows = random_rows(bundle_path, 400, seed=2)
    expected = disagreements_offline(bundle_path, candidate, rows)
    payloads = tmp_path / "payloads"
    env = {
        **SERVED,
        "SHADOW_MODEL_VERSION": "1.1.0",
        "PAYLOAD_LOG_DIR": str(payloads),
        "PAYLOAD_SAMPLE": "1.0",
    }
    with running_gunicorn(model_dir, tmp_path / "logs", env=env) as server:
        send_rows(server, rows)
        wait_for(lambda: scored(server, "1.1.0", len(rows)), 30, what="every row scored")
        counts = shadow_counts(server, "1.1.0")
        info = httpx.get(f"{server.url}/model-info").json()
    assert expected > 0
    assert counts["dropped"] == 0
    assert counts["disagree"] == expected
    assert counts["agree"] == len(rows) - expected
    assert info["shadow"]["agreement"] == pytest.approx((len(rows) - expected) / len(rows))
    # Every row's captured event, written by whichever worker answered it, carries
    # the shadow's answer: its disagreements are the same rows'.
    shadows = [event["data"]["shadow"] for event in read_events(payloads)]
    assert len(shadows) == len(rows)
    assert {(s["version"], s["state"]) for s in shadows} == {("1.1.0", "scored")}
    assert sum(not s["agree"] for s in shadows) == expected


def faulty_candidate(model_dir: Path, tmp_path: Path, fault: Fault) -> dict[str, str]:
    """iris 1.1.0, scikit-learn only, failing after its first calls; the settings to trust it."""
    sklearn_only = train_bundle(
        tmp_path / "trained", "--version", "1.1.0", "--no-onnx", "--n-estimators", "5"
    )
    bundle = copy_bundle(sklearn_only, model_dir)
    make_faulty(bundle, fault)
    return trusting(bundle)


@pytest.mark.parametrize(
    ("fault", "counted", "reason"),
    [
        ("raise", "error", "the shadow raised RuntimeError: the candidate broke"),
        ("sleep", "timeout", "a shadow call took longer than 0.5 s"),
    ],
)
def test_a_candidate_that_raises_or_hangs_is_switched_off_and_the_primary_never_fails(
    model_dir: Path, tmp_path: Path, fault: Fault, counted: str, reason: str
) -> None:
    payloads = tmp_path / "payloads"
    env = {
        **SERVED,
        "SHADOW_MODEL_VERSION": "1.1.0",
        **faulty_candidate(model_dir, tmp_path, fault),
        "PAYLOAD_LOG_DIR": str(payloads),
        "PAYLOAD_SAMPLE": "1.0",
    }
    with running_gunicorn(model_dir, tmp_path / "logs", env=env) as server:
        with Traffic(server.url) as traffic:
            wait_for(
                lambda: shadow_counts(server, "1.1.0")[counted] == 2,
                60,
                what="the shadow switched off in both workers",
            )
            mark = traffic.sent
            wait_for(lambda: traffic.sent > mark + 200, 60, what="traffic after the switch-off")
        info = httpx.get(f"{server.url}/model-info").json()
        log = server.stderr()
    print(f"\nSHADOW-FAULT-ROW | {fault} | {traffic.sent} | {len(traffic.failures)} |", flush=True)
    assert traffic.failures == []
    assert set(traffic.versions) == {"1.0.0"}
    assert log.count("shadow switched off in this worker") == 2
    assert reason in log
    assert info["shadow"]["state"] == "switched_off"
    assert reason in info["shadow"]["reason"]
    assert info["shadow"]["workers_scoring"] == 0
    # Every answer is captured, those of rows the broken shadow held too.
    states = Counter(event["data"]["shadow"]["state"] for event in read_events(payloads))
    assert sum(states.values()) == len(traffic.versions)
    assert set(states) <= {"scored", "switched_off"}
    assert states["switched_off"] > 0


def make_verb(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args, f"SERVE_RUN={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def verbs_env(run_dir: Path) -> dict[str, str]:
    """What `make serve` sets for the verbs, for a server started here."""
    run_dir.mkdir(parents=True)
    return {"ROLLOUT_REQUEST_FILE": str(run_dir / "rollout-request.json")}


def served_version(server: Gunicorn) -> Any:
    return httpx.get(f"{server.url}/health", timeout=10).json()["model_version"]


def test_make_shadow_with_a_candidate_that_fails_its_trial_is_refused_in_one_line(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    broken = copy_bundle(bundle_path, model_dir, version="1.1.0")
    rewrite_file(broken, "model.onnx", b"not an onnx protobuf", update_checksum=True)
    run_dir = tmp_path / "run"
    with running_gunicorn(
        model_dir, tmp_path / "logs", env={**SERVED, **verbs_env(run_dir)}
    ) as server:
        (run_dir / "master.pid").write_text(str(server.pid))
        with Traffic(server.url) as traffic:
            wait_for(lambda: traffic.sent > 50, 30, what="traffic on 1.0.0")
            done = make_verb(run_dir, "shadow", "VERSION=1.1.0")
            mark = traffic.sent
            wait_for(lambda: traffic.sent > mark + 200, 60, what="traffic after the refusal")
        info = httpx.get(f"{server.url}/model-info").json()
        log = server.stderr()
    assert done.returncode != 0
    assert done.stdout.startswith(
        "model shadow refused (sighup), serving 1.0.0 untouched, shadow none: "
    )
    assert "unreadable: onnx" in done.stdout
    assert log.count("model shadow refused (sighup)") == 1
    assert traffic.failures == []
    assert set(traffic.versions) == {"1.0.0"}
    assert info["shadow"] is None
    assert info["rollout"]["shadow"]["result"] == "refused"


def test_a_candidate_with_other_features_is_refused_naming_them(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    other = copy_bundle(bundle_path, model_dir, version="1.1.0")
    manifest_path = other / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"petal_width"', '"petal_w"'))
    env = {**SERVED, "SHADOW_MODEL_VERSION": "1.1.0"}
    with running_gunicorn(model_dir, tmp_path / "logs", env=env) as server:
        info = httpx.get(f"{server.url}/model-info").json()
        log = server.stderr()
    assert "model shadow refused (start), serving 1.0.0 untouched, shadow none" in log
    assert "features differ: the candidate lacks ['petal_width'], has extra ['petal_w']" in log
    assert info["shadow"] is None


def test_make_promote_under_load_loses_no_request_and_leaves_no_shadow(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    copy_bundle(bundle_path, model_dir, version="1.1.0")
    run_dir = tmp_path / "run"
    env = {**SERVED, "SHADOW_MODEL_VERSION": "1.1.0", **verbs_env(run_dir)}
    with running_gunicorn(model_dir, tmp_path / "logs", env=env) as server:
        (run_dir / "master.pid").write_text(str(server.pid))
        with Traffic(server.url) as traffic:
            wait_for(lambda: traffic.sent > 50, 30, what="traffic on 1.0.0")
            done = make_verb(run_dir, "promote")
            wait_for(lambda: traffic.last_versions(50) == ["1.1.0"] * 50, 60, what="1.1.0 only")
        info = httpx.get(f"{server.url}/model-info").json()
        version = served_version(server)
    print(f"\nSHADOW-PROMOTE-ROW | {traffic.sent} | {len(traffic.failures)} | {version} |")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "promoted: serving 1.1.0, no shadow"
    assert traffic.failures == []
    assert traffic.versions[0] == "1.0.0"
    assert version == "1.1.0"
    assert info["shadow"] is None
    assert info["rollout"]["last_attempt"]["trigger"] == "promote"
    assert info["rollout"]["shadow"]["result"] == "off"
    assert os.path.exists(run_dir / "rollout-request.json") is False
