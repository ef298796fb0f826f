"""Shadow scoring's parts: the comparison, the bounded queue and its switch-off,
what fits as a shadow, and the master's shadow decisions."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.backends.base import FloatMatrix, Outputs
from service.manifest import IntegerFeature, Manifest
from service.server.rollout import Rollouts, TrialResult
from service.server.rollout_record import read_record
from service.server.rollout_request import (
    RolloutRequest,
    main,
    outcome_file,
    take_request,
)
from service.server.shadow_fit import mismatch
from service.settings import PINNED_BUNDLE_VARIABLE, SHADOW_BUNDLE_VARIABLE, PinnedBundle
from service.shadow.compare import compare
from service.shadow.scorer import (
    HANDOVER_SECONDS,
    ShadowCandidate,
    ShadowResult,
    ShadowScorer,
)
from tests.support.bundles import copy_bundle

# ---------------------------------------------------------- the comparison --


def test_classifiers_agree_on_the_same_class_and_differ_by_the_largest_probability_gap() -> None:
    primary = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.4, 0.35, 0.25]])
    candidate = np.array([[0.6, 0.4, 0.0], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    result = compare(primary, candidate, classifier=True, tolerance=1e-4)
    assert (result.agree, result.disagree) == (2, 1)
    assert result.differences.tolist() == pytest.approx([0.3, 0.2, 0.0])
    assert result.candidate_answers.tolist() == [0, 2, 0]


def test_regressors_agree_within_the_parity_tolerance_relative_to_the_served_value() -> None:
    primary = np.array([100.0, 100.0, 0.5, -200.0])
    # 1e-3 relative to 100 is 0.1; below |1| the difference is absolute.
    candidate = np.array([100.05, 100.2, 0.5009, -200.0])
    result = compare(primary, candidate, classifier=False, tolerance=1e-3)
    assert (result.agree, result.disagree) == (3, 1)
    assert result.differences.tolist() == pytest.approx([5e-4, 2e-3, 9e-4, 0.0])


def test_a_row_with_no_finite_difference_disagrees_and_is_not_observed() -> None:
    primary = np.array([[0.9, 0.1], [0.5, 0.5]])
    candidate = np.array([[math.nan, 0.1], [0.5, 0.5]])
    result = compare(primary, candidate, classifier=True, tolerance=0)
    assert (result.agree, result.disagree) == (1, 1)
    assert result.differences.tolist() == [0.0]


def test_outputs_of_another_shape_are_an_error() -> None:
    with pytest.raises(ValueError, match="expected"):
        compare(np.zeros((2, 3)), np.zeros((2, 2)), classifier=True, tolerance=0)


# -------------------------------------------------------------- the queue --


class Backend:
    """A candidate whose calls the test controls: it echoes the rows' first
    column as class-0 probability, blocks while `gate` is clear, or raises."""

    name = "test"

    def __init__(self, *, raises: bool = False) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.raises = raises
        self.calls: list[int] = []

    def predict(self, rows: FloatMatrix) -> Outputs:
        self.calls.append(rows.shape[0])
        self.gate.wait()
        if self.raises:
            raise RuntimeError("boom")
        return np.stack([rows[:, 0], 1 - rows[:, 0]], axis=1)


def scorer_for(backend: Backend, *, queue_rows: int = 100, timeout: float = 5) -> ShadowScorer:
    candidate = ShadowCandidate("1.1.0", backend, "/bundles/1.1.0", True, 1e-4)
    return ShadowScorer(candidate, queue_rows=queue_rows, timeout=timeout, max_rows_per_call=50)


async def settle(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def test_rows_are_scored_after_the_request_and_compared_with_its_answer() -> None:
    async def run() -> None:
        backend = Backend()
        scorer = scorer_for(backend)
        scorer.start()
        scorer.submit([0.9, 0.0], [0.9, 0.1])  # agrees
        scorer.submit([0.2, 0.0], [0.9, 0.1])  # candidate says class 1
        scorer.submit(np.array([[0.7, 0.0], [0.6, 0.0]]), np.array([[0.7, 0.3], [0.6, 0.4]]))
        # Nothing reaches the thread before the submitting task yields.
        assert backend.calls == []
        await settle(lambda: scorer.counts.agree + scorer.counts.disagree == 4)
        await scorer.stop()
        assert (scorer.counts.agree, scorer.counts.disagree) == (3, 1)
        assert sum(backend.calls) == 4

    asyncio.run(run())


def test_rows_beyond_the_queue_bound_are_dropped_and_counted_never_waited_for() -> None:
    async def run() -> None:
        backend = Backend()
        backend.gate.clear()
        scorer = scorer_for(backend, queue_rows=10)
        scorer.start()
        scorer.submit(np.zeros((1, 2)), np.zeros((1, 2)))
        await settle(lambda: backend.calls == [1])  # the thread is busy with that row
        for _ in range(4):
            scorer.submit(np.zeros((4, 2)), np.full((4, 2), 0.5))
        await asyncio.sleep(2 * HANDOVER_SECONDS)  # the hand-over's timer fires first
        # 10 rows fit: two batches of 4; the other two batches are dropped.
        assert scorer.counts.dropped == 8
        backend.gate.set()
        await settle(lambda: scorer.counts.agree + scorer.counts.disagree == 9)
        await scorer.stop()

    asyncio.run(run())


def test_a_candidate_that_raises_is_switched_off_with_its_queue_dropped() -> None:
    async def run() -> None:
        backend = Backend(raises=True)
        backend.gate.clear()
        scorer = scorer_for(backend)
        scorer.start()
        scorer.submit(np.zeros((1, 2)), np.zeros((1, 2)))
        await settle(lambda: backend.calls == [1])
        scorer.submit(np.zeros((3, 2)), np.zeros((3, 2)))
        await asyncio.sleep(2 * HANDOVER_SECONDS)  # the hand-over's timer fires first
        backend.gate.set()
        await settle(lambda: scorer.state == "switched_off")
        assert scorer.reason == "the shadow raised RuntimeError: boom"
        assert (scorer.counts.failures, scorer.counts.dropped) == (1, 3)
        scorer.submit(np.zeros((1, 2)), np.zeros((1, 2)))
        await asyncio.sleep(0.05)
        assert backend.calls == [1]
        await scorer.stop()

    asyncio.run(run())


def test_a_call_that_outlives_the_timeout_switches_the_shadow_off_and_is_not_counted() -> None:
    async def run() -> None:
        backend = Backend()
        backend.gate.clear()
        scorer = scorer_for(backend, timeout=0.05)
        scorer.start()
        scorer.submit(np.zeros((1, 2)), np.zeros((1, 2)))
        await settle(lambda: scorer.state == "switched_off")
        assert scorer.reason == "a shadow call took longer than 0.05 s"
        backend.gate.set()  # the hung call returns: its answer is thrown away
        await asyncio.sleep(0.05)
        assert scorer.counts.agree + scorer.counts.disagree == 0
        await scorer.stop()

    asyncio.run(run())


# ------------------------------------------------- following a request --


def test_followed_rows_get_the_candidate_s_outputs_and_agreement_per_row() -> None:
    async def run() -> None:
        scorer = scorer_for(Backend())
        scorer.start()
        results: dict[str, ShadowResult] = {}
        scorer.submit(np.array([[0.7, 0.0], [0.2, 0.0]]), batch := np.array([[0.7, 0.3]] * 2))
        scorer.follow(batch, functools.partial(results.__setitem__, "batch"))
        scorer.submit([0.9, 0.0], [0.9, 0.1])  # not followed
        scorer.submit([0.3, 0.0], single := [0.9, 0.1])
        scorer.follow(single, functools.partial(results.__setitem__, "single"))
        await settle(lambda: len(results) == 2)
        await scorer.stop()
        # Single rows are stacked first: the followed one's slice is still its own.
        one, two = results["single"], results["batch"]
        assert (one.version, one.state) == (two.version, two.state) == ("1.1.0", "scored")
        assert np.allclose(one.outputs, [[0.3, 0.7]])  # type: ignore[arg-type]
        assert np.array_equal(one.agrees, [False])  # type: ignore[arg-type]
        assert np.allclose(two.outputs, [[0.7, 0.3], [0.2, 0.8]])  # type: ignore[arg-type]
        assert np.array_equal(two.agrees, [True, False])  # type: ignore[arg-type]
        assert (scorer.counts.agree, scorer.counts.disagree) == (2, 2)

    asyncio.run(run())


def test_followed_rows_the_queue_had_no_room_for_are_told_they_were_dropped() -> None:
    async def run() -> None:
        backend = Backend()
        backend.gate.clear()
        scorer = scorer_for(backend, queue_rows=4)
        scorer.start()
        scorer.submit(np.zeros((1, 2)), np.zeros((1, 2)))
        await settle(lambda: backend.calls == [1])
        results: dict[str, ShadowResult] = {}
        scorer.submit(np.zeros((3, 2)), fits := np.zeros((3, 2)))
        scorer.follow(fits, functools.partial(results.__setitem__, "fits"))
        scorer.submit(np.zeros((3, 2)), beyond := np.full((3, 2), 0.5))
        scorer.follow(beyond, functools.partial(results.__setitem__, "beyond"))
        await asyncio.sleep(2 * HANDOVER_SECONDS)  # the hand-over's timer fires first
        assert scorer.counts.dropped == 3
        assert list(results) == ["beyond"]
        assert results["beyond"].state == "dropped"
        assert results["beyond"].outputs is None
        backend.gate.set()
        await settle(lambda: "fits" in results)
        assert results["fits"].state == "scored"
        await scorer.stop()

    asyncio.run(run())


def test_followed_rows_of_a_shadow_that_raises_or_hangs_are_told_once_it_was_switched_off() -> None:
    async def run(raises: bool) -> list[ShadowResult]:
        backend = Backend(raises=raises)
        backend.gate.clear()
        scorer = scorer_for(backend, timeout=5 if raises else 0.05)
        scorer.start()
        results: list[ShadowResult] = []
        scorer.submit(np.zeros((1, 2)), in_call := np.zeros((1, 2)))
        scorer.follow(in_call, results.append)
        await settle(lambda: backend.calls == [1])
        scorer.submit(np.zeros((2, 2)), queued := np.zeros((2, 2)))
        scorer.follow(queued, results.append)
        await asyncio.sleep(2 * HANDOVER_SECONDS)
        if raises:
            backend.gate.set()
        await settle(lambda: scorer.state == "switched_off")
        backend.gate.set()  # a hung call returns: its answer reaches no one
        await asyncio.sleep(0.05)
        scorer.submit(np.zeros((1, 2)), late := np.zeros((1, 2)))
        scorer.follow(late, results.append)  # told at once: nothing will score it
        await scorer.stop()
        return results

    for raises in (True, False):
        results = asyncio.run(run(raises))
        assert [r.state for r in results] == ["switched_off"] * 3
        assert all(r.outputs is None for r in results)


def test_followed_rows_still_waiting_when_the_worker_stops_are_told_so() -> None:
    async def run() -> None:
        backend = Backend()
        backend.gate.clear()
        scorer = scorer_for(backend)
        scorer.start()
        results: list[ShadowResult] = []
        scorer.submit(np.zeros((1, 2)), in_call := np.zeros((1, 2)))
        scorer.follow(in_call, results.append)
        await settle(lambda: backend.calls == [1])
        scorer.submit(np.zeros((1, 2)), queued := np.zeros((1, 2)))
        scorer.follow(queued, results.append)
        await asyncio.sleep(2 * HANDOVER_SECONDS)
        scorer.submit(np.zeros((1, 2)), pending := np.zeros((1, 2)))
        scorer.follow(pending, results.append)
        await scorer.stop()
        assert [r.state for r in results] == ["stopped"] * 3
        backend.gate.set()
        await asyncio.sleep(0.05)
        assert len(results) == 3

    asyncio.run(run())


# ---------------------------------------------------------------- the fit --


@pytest.fixture
def manifest(bundle_path: Path) -> Manifest:
    return Manifest.model_validate_json((bundle_path / "manifest.json").read_bytes())


def test_a_candidate_fits_when_task_features_and_classes_are_the_same(manifest: Manifest) -> None:
    assert mismatch(manifest, manifest.model_copy(update={"version": "1.1.0"})) is None


def test_each_difference_that_stops_a_shadow_is_named(manifest: Manifest) -> None:
    features = list(manifest.features)
    renamed = features[0].model_copy(update={"name": "sepal_len"})
    integer = IntegerFeature(name="sepal_length", description="whole centimetres")
    cases: dict[str, dict[str, object]] = {
        "features differ: the candidate lacks ['sepal_length'], has extra ['sepal_len']": {
            "features": [renamed, *features[1:]]
        },
        "features differ in order": {"features": [features[1], features[0], *features[2:]]},
        "feature 'sepal_length' differs: serving number, candidate integer": {
            "features": [integer, *features[1:]]
        },
        "classes differ": {"classes": ["a", "b", "c"]},
        "task differs: serving classification, candidate regression": {"task": "regression"},
    }
    for expected, update in cases.items():
        reason = mismatch(manifest, manifest.model_copy(update=update))
        assert reason is not None
        assert reason.startswith(expected), reason


# ------------------------------------------------------------- the master --

DIGEST = "ab" * 32


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: object) -> None:
        self.lines.append(message % args)

    error = info


def trial_reading_the_manifest(path: Path, timeout: float) -> TrialResult:
    import hashlib

    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    return TrialResult(ok=True, version=path.name, manifest_sha256=digest, backend="onnx")


@pytest.fixture
def master_env(model_dir: Path, bundle_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setenv("MODEL_VERSION", "1.0.0")
    monkeypatch.setenv("SHADOW_MODEL_VERSION", "1.1.0")
    for variable in (PINNED_BUNDLE_VARIABLE, SHADOW_BUNDLE_VARIABLE):
        # Set then deleted, so monkeypatch removes what Rollouts writes afterwards.
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    copy_bundle(bundle_path, model_dir, version="1.1.0")
    return model_dir


def test_the_master_pins_a_fitting_shadow_at_start_beside_the_served_version(
    master_env: Path, tmp_path: Path
) -> None:
    rollouts, log = Rollouts(trial_reading_the_manifest), Log()
    rollouts.start(tmp_path, log)
    shadow = PinnedBundle.model_validate_json(os.environ[SHADOW_BUNDLE_VARIABLE])
    assert shadow.path == master_env / "iris" / "1.1.0"
    assert PinnedBundle.model_validate_json(os.environ[PINNED_BUNDLE_VARIABLE]).version == "1.0.0"
    assert log.lines[-1].startswith("model shadow accepted (start): iris 1.1.0")
    record = read_record(tmp_path)
    assert record is not None
    assert record.shadow is not None
    assert (record.shadow.result, record.shadow.shadowing) == ("accepted", "1.1.0")


def test_a_refused_shadow_leaves_the_served_version_and_the_earlier_shadow(
    master_env: Path, tmp_path: Path
) -> None:
    rollouts = Rollouts(trial_reading_the_manifest)
    rollouts.start(tmp_path, Log())
    before = dict(os.environ)
    rollouts._run_trial = lambda path, timeout: TrialResult(ok=False, reason="it is broken")
    log = Log()
    ok, line = rollouts.try_shadow("sighup", "1.1.0", tmp_path, log)
    assert not ok
    assert (
        line == "model shadow refused (sighup), serving 1.0.0 untouched, shadow 1.1.0: it is broken"
    )
    assert log.lines == [line]
    for variable in (PINNED_BUNDLE_VARIABLE, SHADOW_BUNDLE_VARIABLE):
        assert os.environ[variable] == before[variable]


def request_file(tmp_path: Path, action: str, version: str | None = None) -> Path:
    path = tmp_path / "request.json"
    path.write_text(RolloutRequest(id="r1", action=action, version=version).model_dump_json())
    return path


def test_a_promote_request_rolls_the_shadow_out_and_clears_it(
    master_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollouts = Rollouts(trial_reading_the_manifest)
    rollouts.start(tmp_path, Log())
    path = request_file(tmp_path, "promote")
    monkeypatch.setenv("ROLLOUT_REQUEST_FILE", str(path))
    rollouts.reload(tmp_path, Log())
    assert PinnedBundle.model_validate_json(os.environ[PINNED_BUNDLE_VARIABLE]).version == "1.1.0"
    assert SHADOW_BUNDLE_VARIABLE not in os.environ
    outcome = json.loads(outcome_file(path).read_text())
    assert outcome == {"id": "r1", "ok": True, "message": "promoted: serving 1.1.0, no shadow"}
    assert not path.exists()
    # MODEL_VERSION named 1.0.0: a later plain SIGHUP keeps what was promoted.
    rollouts.reload(tmp_path, Log())
    assert PinnedBundle.model_validate_json(os.environ[PINNED_BUNDLE_VARIABLE]).version == "1.1.0"


def test_a_plain_sighup_that_serves_the_shadow_s_version_clears_the_shadow(
    master_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rollouts = Rollouts(trial_reading_the_manifest)
    rollouts.start(tmp_path, Log())
    monkeypatch.setenv("MODEL_VERSION", "1.1.0")
    log = Log()
    rollouts.reload(tmp_path, log)
    assert SHADOW_BUNDLE_VARIABLE not in os.environ
    assert "model shadow off (sighup): 1.1.0" in log.lines[-1]


def test_an_unreadable_request_is_named_and_taken_away(tmp_path: Path) -> None:
    path = tmp_path / "request.json"
    path.write_text('{"id": "x", "action": "demote"}')
    reason = take_request(path)
    assert isinstance(reason, str)
    assert reason.startswith(f"rollout request {path} invalid")
    assert not path.exists()
    assert take_request(path) is None


def test_the_verbs_say_so_when_no_server_is_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--request-file", str(tmp_path / "r.json"), "--pid-file", str(tmp_path / "pid")]
    assert main([*args, "promote"]) == 2
    assert "no running server" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "shadow"])  # shadow needs a VERSION
    with pytest.raises(SystemExit):
        main([*args, "shadow", "latest"])
    assert "'latest' is not a semantic version" in capsys.readouterr().err
