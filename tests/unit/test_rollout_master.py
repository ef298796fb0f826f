"""The master's rollout decisions, with the trial stubbed out (process tests run it for real)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from service.bundle import BundleError
from service.predictor import load_predictor
from service.server.rollout import Rollouts, TrialResult
from service.server.rollout_record import read_record
from service.settings import PINNED_BUNDLE_VARIABLE, PinnedBundle, ServiceSettings
from tests.support.bundles import copy_bundle

DIGEST = "ab" * 32


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def info(self, message: str, *args: object) -> None:
        self.lines.append((logging.INFO, message % args))

    def error(self, message: str, *args: object) -> None:
        self.lines.append((logging.ERROR, message % args))


def passing(path: Path, timeout: float) -> TrialResult:
    return TrialResult(ok=True, version=path.name, manifest_sha256=DIGEST, backend="onnx")


def failing(path: Path, timeout: float) -> TrialResult:
    return TrialResult(ok=False, reason=f"model bundle refused: {path}: it is broken")


@pytest.fixture
def env(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    # Set then deleted, so monkeypatch removes the pin Rollouts writes afterwards.
    monkeypatch.setenv(PINNED_BUNDLE_VARIABLE, "")
    monkeypatch.delenv(PINNED_BUNDLE_VARIABLE)
    return model_dir


def pinned() -> PinnedBundle:
    return PinnedBundle.model_validate_json(os.environ[PINNED_BUNDLE_VARIABLE])


def test_an_accepted_candidate_is_pinned_by_path_version_and_digest(
    env: Path, tmp_path: Path
) -> None:
    rollouts, log = Rollouts(passing), Log()
    rollouts.start(tmp_path, log)
    assert pinned() == PinnedBundle(
        path=env / "iris" / "1.0.0", version="1.0.0", manifest_sha256=DIGEST
    )
    record = read_record(tmp_path)
    assert record is not None
    assert record.counts == {"accepted": 1, "refused": 0}
    assert [level for level, _ in log.lines] == [logging.INFO]


def test_a_refused_candidate_leaves_the_pin_and_says_why_in_one_line(
    env: Path, bundle_path: Path, tmp_path: Path
) -> None:
    rollouts = Rollouts(passing)
    rollouts.start(tmp_path, Log())
    before = os.environ[PINNED_BUNDLE_VARIABLE]
    copy_bundle(bundle_path, env, version="1.1.0")
    rollouts._run_trial = failing
    log = Log()
    rollouts.reload(tmp_path, log)
    assert os.environ[PINNED_BUNDLE_VARIABLE] == before
    assert log.lines == [
        (
            logging.ERROR,
            "model rollout refused (sighup), still serving 1.0.0: "
            f"model bundle refused: {env / 'iris' / '1.1.0'}: it is broken",
        )
    ]
    record = read_record(tmp_path)
    assert record is not None
    assert record.last is not None
    assert record.serving is not None
    assert record.counts == {"accepted": 1, "refused": 1}
    assert (record.last.version, record.last.result) == ("1.1.0", "refused")
    assert record.serving.version == "1.0.0"


def test_nothing_servable_at_start_exits_non_zero(env: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        Rollouts(failing).start(tmp_path, Log())
    assert exited.value.code != 0
    assert PINNED_BUNDLE_VARIABLE not in os.environ


def test_a_missing_candidate_on_sighup_is_refused_without_a_trial(
    env: Path, tmp_path: Path
) -> None:
    rollouts = Rollouts(passing)
    rollouts.start(tmp_path, Log())
    shutil.rmtree(env / "iris")
    trials: list[Path] = []

    def recorded(path: Path, timeout: float) -> TrialResult:
        trials.append(path)
        return passing(path, timeout)

    rollouts._run_trial = recorded
    attempt = rollouts.attempt("sighup", tmp_path, Log())
    assert (attempt.result, trials) == ("refused", [])
    assert "missing: no bundles for this model name" in (attempt.reason or "")
    assert pinned().version == "1.0.0"


def test_an_internal_error_on_sighup_never_escapes_into_gunicorn(env: Path, tmp_path: Path) -> None:
    def broken(path: Path, timeout: float) -> TrialResult:
        raise RuntimeError("bug")

    rollouts = Rollouts(passing)
    rollouts.start(tmp_path, Log())
    rollouts._run_trial = broken
    log = Log()
    rollouts.reload(tmp_path, log)
    assert "internal error" in log.lines[-1][1]
    assert pinned().version == "1.0.0"


def test_a_worker_refuses_a_pinned_bundle_that_changed_since_its_trial(
    bundle_path: Path, model_dir: Path
) -> None:
    manifest_path = bundle_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["estimator"]["params"]["note"] = "edited after the trial"
    manifest_path.write_text(json.dumps(manifest))
    pin = PinnedBundle(path=bundle_path, version="1.0.0", manifest_sha256=DIGEST)
    with pytest.raises(BundleError, match=r"changed since the master proved it"):
        load_predictor(ServiceSettings(model_dir=model_dir, pinned_bundle=pin))


def test_manifest_text_in_the_masters_log_cannot_forge_a_line(env: Path, tmp_path: Path) -> None:
    def forged(path: Path, timeout: float) -> TrialResult:
        return TrialResult(
            ok=True,
            version=path.name,
            manifest_sha256=DIGEST,
            backend="onnx",
            classes_predicted=["setosa\n[CRITICAL] forged", "\x1b[2Jvirginica"],
        )

    log = Log()
    Rollouts(forged).start(tmp_path, log)
    [(_, line)] = log.lines
    assert "\n" not in line
    assert "\x1b" not in line
    assert "setosa\\n[CRITICAL] forged,\\x1b[2Jvirginica" in line
