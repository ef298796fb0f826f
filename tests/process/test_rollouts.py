"""Rollouts under real Gunicorn and concurrent load: no bundle can take the service down.

Each fault runs with traffic on a new connection per request throughout, and
checks: zero failed requests, the master alive, and the version served after
(the old one for every bad bundle, the new one for a good one). Each test
prints one row of the fault table: fault, requests sent, failed, version after.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.bundles import copy_bundle, rewrite_file, train_bundle, trusting
from tests.support.scrape import parse_samples, sample
from tests.support.servers import Gunicorn, running_gunicorn, wait_for
from tests.support.traffic import Traffic

pytestmark = pytest.mark.process


def stage(source: Path, model_dir: Path, version: str, damage: Callable[[Path], None]) -> Path:
    """Copy a bundle in as docs/operations.md says: under a name it ignores, then renamed."""
    staging = copy_bundle(source, model_dir, version=".incoming")
    manifest_path = staging / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = version
    manifest_path.write_text(json.dumps(manifest, indent=2))
    damage(staging)
    return staging.rename(staging.parent / version)


def unloadable_onnx(bundle: Path) -> None:
    rewrite_file(bundle, "model.onnx", b"not an onnx protobuf", update_checksum=True)


def missing_onnx(bundle: Path) -> None:
    (bundle / "model.onnx").unlink()


def tampered_onnx(bundle: Path) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))


def intact(bundle: Path) -> None:
    pass


def report(fault: str, traffic: Traffic, version: str) -> None:
    print(
        f"\nROLLOUT-ROW | {fault} | {traffic.sent} | {len(traffic.failures)} | {version} |",
        flush=True,
    )


def replaced_workers(server: Gunicorn, old: set[int], workers: int, loaded: int) -> bool:
    now = server.worker_pids()
    return now.isdisjoint(old) and len(now) == workers and server.loaded_count() >= loaded


def sighup_and_settle(server: Gunicorn, traffic: Traffic, workers: int = 2) -> int:
    """SIGHUP, wait until only new workers serve, then let traffic run on them."""
    old, loaded = server.worker_pids(), server.loaded_count()
    server.signal(signal.SIGHUP)
    wait_for(
        lambda: replaced_workers(server, old, workers, loaded + workers), 60, what="new workers"
    )
    mark = traffic.sent
    wait_for(lambda: traffic.sent > mark + 200, 60, what="traffic on the new workers")
    return mark


def served_now(server: Gunicorn) -> str:
    version: str = httpx.get(f"{server.url}/health", timeout=10).json()["model_version"]
    return version


@pytest.mark.parametrize(
    ("fault", "damage", "reason"),
    [
        ("SIGHUP, unloadable model.onnx with valid checksums", unloadable_onnx, "unreadable: onnx"),
        ("SIGHUP, a file missing", missing_onnx, "missing: model.onnx"),
    ],
)
def test_sighup_with_a_bad_bundle_keeps_serving_the_old_version(
    model_dir: Path,
    bundle_path: Path,
    tmp_path: Path,
    fault: str,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    with running_gunicorn(model_dir, tmp_path / "logs", workers=2) as server:
        with Traffic(server.url) as traffic:
            wait_for(lambda: traffic.sent > 50, 30, what="traffic on 1.0.0")
            stage(bundle_path, model_dir, "1.1.0", damage)
            mark = sighup_and_settle(server, traffic)
        assert server.process.poll() is None
        info = httpx.get(f"{server.url}/model-info").json()
        metrics = parse_samples(httpx.get(f"{server.url}/metrics").text)
        version = served_now(server)
    report(fault, traffic, version)
    assert traffic.failures == []
    assert set(traffic.versions) == {"1.0.0"}
    assert traffic.versions_since(mark)["1.0.0"] > 200
    assert version == "1.0.0"
    assert "model rollout refused (sighup), still serving 1.0.0" in server.stderr()
    assert reason in server.stderr()
    last = info["rollout"]["last_attempt"]
    assert (last["version"], last["result"]) == ("1.1.0", "refused")
    assert reason in last["reason"]
    assert sample(metrics, "model_rollouts_total", result="refused") == 1
    assert sample(metrics, "model_rollouts_total", result="accepted") == 1


def test_sighup_with_an_incompatible_scikit_learn_keeps_serving_the_old_version(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    sklearn_only = train_bundle(tmp_path / "trained", "--no-onnx", "--n-estimators", "5")

    def incompatible(bundle: Path) -> None:
        manifest_path = bundle / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["libraries"]["scikit_learn"] = "0.24.2"
        manifest_path.write_text(json.dumps(manifest))

    # Pinned, so the refusal is about the library version and nothing else.
    env = trusting(sklearn_only)
    with running_gunicorn(model_dir, tmp_path / "logs", workers=2, env=env) as server:
        with Traffic(server.url) as traffic:
            wait_for(lambda: traffic.sent > 50, 30, what="traffic on 1.0.0")
            stage(sklearn_only, model_dir, "1.1.0", incompatible)
            sighup_and_settle(server, traffic)
        assert server.process.poll() is None
        version = served_now(server)
    report("SIGHUP, incompatible scikit-learn declared", traffic, version)
    assert traffic.failures == []
    assert set(traffic.versions) == {"1.0.0"}
    assert "incompatible library version: trained with scikit-learn 0.24.2" in server.stderr()


def test_sighup_with_a_good_version_rolls_it_out_within_seconds(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    with running_gunicorn(model_dir, tmp_path / "logs", workers=2) as server:
        with Traffic(server.url) as traffic:
            wait_for(lambda: traffic.sent > 50, 30, what="traffic on 1.0.0")
            stage(bundle_path, model_dir, "1.1.0", intact)
            mark = sighup_and_settle(server, traffic)
            wait_for(lambda: traffic.last_versions(50) == ["1.1.0"] * 50, 30, what="1.1.0 only")
        assert server.process.poll() is None
        info = httpx.get(f"{server.url}/model-info").json()
        version = served_now(server)
    report("SIGHUP, good new version", traffic, version)
    assert traffic.failures == []
    assert traffic.versions[0] == "1.0.0"
    assert traffic.versions_since(mark)["1.1.0"] > 0
    assert version == "1.1.0"
    assert info["bundle_path"] == str(model_dir / "iris" / "1.1.0")
    assert info["rollout"]["last_attempt"]["result"] == "accepted"


@pytest.mark.parametrize(
    ("fault", "damage"),
    [
        ("tampered bundle appears while workers recycle", tampered_onnx),
        ("good bundle appears, no SIGHUP, workers recycle", intact),
    ],
)
def test_a_bundle_appearing_while_workers_recycle_changes_nothing(
    model_dir: Path,
    bundle_path: Path,
    tmp_path: Path,
    fault: str,
    damage: Callable[[Path], None],
) -> None:
    # Workers restart every ~60 requests: each restart loads the pinned bundle.
    env = {"MAX_REQUESTS": "60", "MAX_REQUESTS_JITTER": "20"}
    with running_gunicorn(model_dir, tmp_path / "logs", workers=2, env=env) as server:
        with Traffic(server.url) as traffic:
            wait_for(lambda: traffic.sent > 50, 30, what="traffic on 1.0.0")
            stage(bundle_path, model_dir, "1.0.1", damage)
            loaded = server.loaded_count()
            wait_for(lambda: server.loaded_count() >= loaded + 6, 120, what="6 worker restarts")
        assert server.process.poll() is None
        version = served_now(server)
    report(fault, traffic, version)
    assert traffic.failures == []
    assert set(traffic.versions) == {"1.0.0"}
    assert "model bundle refused" not in server.stderr()


def test_a_worker_that_cannot_load_its_pinned_bundle_waits_not_ready_and_recovers(
    model_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    """The disk went away: the master stays up, the worker says not ready and retries."""
    hidden = tmp_path / "hidden"
    with running_gunicorn(model_dir, tmp_path / "logs", workers=1) as server:
        (worker,) = server.worker_pids()
        bundle_path.rename(hidden)
        # Its replacement finds no bundle where the master pinned it.
        os.kill(worker, signal.SIGTERM)
        wait_for(lambda: "missing: no such bundle directory" in server.stderr(), 60, what="refusal")
        ready = httpx.get(f"{server.url}/health/ready", timeout=10)
        predict = httpx.post(f"{server.url}/predict", json={}, timeout=10)
        assert server.process.poll() is None
        hidden.rename(bundle_path)
        wait_for(lambda: httpx.get(f"{server.url}/health/ready").status_code == 200, 60)
        assert server.process.poll() is None
    assert ready.status_code == 503
    assert predict.status_code == 503
    assert predict.headers["retry-after"] == "1"
