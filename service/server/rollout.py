"""The Gunicorn master chooses the model version; workers only load it.

At start and on SIGHUP the master resolves the candidate bundle (MODEL_VERSION,
or the highest version in MODEL_DIR) and proves it can be served in a
throwaway subprocess: verify, load, warm up, predict (`python -m
service.server.rollout <bundle>`). The master itself never loads a model, so it never
unpickles anything. Only a candidate that passed is pinned, by path, version
and manifest digest, in an environment variable every worker forked afterwards
inherits: a worker restarted for any reason (MAX_REQUESTS, a crash) loads
exactly that bundle, never "whatever is newest now". A refused candidate
leaves the pin, and so the serving version, as it was; the refusal is one log
line, a count in `model_rollouts_total{result}` and the last attempt in
`/model-info`.

A shadow candidate (SHADOW_MODEL_VERSION at start; `make shadow`, `make
shadow-off`, `make promote` later, through service.server.rollout_request) is
proved by the same trial, must fit the version serving (service.server.
shadow_fit), and is pinned the same way in a second variable; the served
version is never touched by it. A promotion is a rollout of the shadow's
pinned path.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel

from service.bundle import BundleError, resolve_bundle_dir
from service.logs import escape
from service.manifest import Manifest
from service.server.rollout_record import (
    RolloutAttempt,
    ShadowDecision,
    Trigger,
    now,
    record_attempt,
    record_shadow,
)
from service.server.rollout_request import answer, take_request
from service.server.shadow_fit import check_fit
from service.settings import (
    PINNED_BUNDLE_VARIABLE,
    SHADOW_BUNDLE_VARIABLE,
    PinnedBundle,
    ServiceSettings,
)

# The master exits with this when, at start, nothing can be served at all.
NOTHING_TO_SERVE = 1
TRIAL_RANDOM_ROWS = 256
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The trial must not write into the server's metrics or inherit the current pin.
_NOT_FOR_THE_TRIAL = ("PROMETHEUS_MULTIPROC_DIR", PINNED_BUNDLE_VARIABLE, SHADOW_BUNDLE_VARIABLE)


class TrialResult(BaseModel):
    ok: bool
    reason: str | None = None
    version: str | None = None
    manifest_sha256: str | None = None
    backend: str | None = None
    classes_predicted: list[str] = []


# --------------------------------------------------------------- the trial --


Instance = dict[str, float | int | str]


def _trial_rows(manifest: Manifest, example: Instance, max_rows: int) -> list[Instance]:
    """The reference example, each training decile, and random rows inside the
    training range (every category in turn); a feature without reference
    statistics keeps its example value."""
    import numpy as np

    from service.manifest import CategoryFeature, IntegerFeature

    rng = np.random.default_rng(0)
    count = max(1, min(TRIAL_RANDOM_ROWS, max_rows))
    columns: dict[str, list[float | int | str]] = {}
    for feature in manifest.features:
        if isinstance(feature, CategoryFeature):
            column: list[float | int | str] = [
                feature.categories[i % len(feature.categories)] for i in range(count)
            ]
        elif feature.deciles is not None:
            # The manifest gives deciles, min, max and mean together.
            assert feature.training_min is not None
            assert feature.training_max is not None
            values = [
                *feature.deciles,
                *rng.uniform(feature.training_min, feature.training_max, count).tolist(),
            ]
            if isinstance(feature, IntegerFeature):
                column = [round(v) for v in values]
            else:
                column = list(values)
        else:
            column = [example[feature.field_name]]
        columns[feature.field_name] = column
    rows = [example]
    for i in range(count - 1):
        rows.append({name: column[i % len(column)] for name, column in columns.items()})
    return rows[:max_rows]


def _agree(single: dict[str, Any], batch: dict[str, Any]) -> bool:
    if "predicted_class_name" in batch:
        return bool(single["predicted_class_name"] == batch["predicted_class_name"])
    scale = max(1.0, abs(batch["prediction"]))
    return bool(abs(single["prediction"] - batch["prediction"]) <= 1e-6 * scale)


async def _prove(settings: ServiceSettings, path: Path) -> TrialResult:
    from service.pipeline import PredictionPipeline
    from service.predict_codec import PredictCodec
    from service.predictor import load_predictor, start_micro_batching

    predictor = load_predictor(settings)
    start_micro_batching(predictor, settings)
    try:
        manifest = predictor.manifest
        pipeline = PredictionPipeline(predictor, settings.max_batch_size)
        codec = PredictCodec(manifest, settings.max_batch_size)
        rows = _trial_rows(manifest, codec.models.example, settings.max_batch_size)
        features = codec.decode_batch(orjson.dumps({"instances": rows}))
        batch = orjson.loads(codec.encode_batch(await pipeline.run(features)))
        answers = batch["predictions"]
        # Single-row predictions through the same path a request takes, which
        # must agree with the batch: one per class the batch reached, or, for
        # a regressor, the example and the first decile rows.
        checked: dict[str, int] = {}
        for index, answer in enumerate(answers):
            key = answer.get("predicted_class_name", str(index))
            if key not in checked and (manifest.classes is not None or index < 4):
                checked[key] = index
        for index in checked.values():
            row = codec.decode_one(orjson.dumps(rows[index]))
            single = orjson.loads(codec.encode_one(await pipeline.run_row(row)))
            if not _agree(single, answers[index]) or single["model_version"] != path.name:
                raise BundleError(path, f"trial: single-row answer {single} disagrees with batch")
        return TrialResult(
            ok=True,
            version=manifest.version,
            manifest_sha256=predictor.manifest_sha256,
            backend=predictor.backend.name,
            classes_predicted=[c for c in manifest.classes or () if c in checked],
        )
    finally:
        if predictor.batcher is not None:
            await predictor.batcher.stop()


def trial(path: Path) -> TrialResult:
    """Runs in the throwaway subprocess: prove `path` can serve, as a worker would."""
    try:
        settings = ServiceSettings(
            model_dir=path.parent.parent,
            model_version=path.name,
            metrics_enabled=False,
            pinned_bundle=None,
        )
        return asyncio.run(_prove(settings, path))
    except BundleError as exc:
        return TrialResult(ok=False, reason=str(exc))
    except Exception as exc:
        return TrialResult(ok=False, reason=f"trial failed: {type(exc).__name__}: {exc}")


# -------------------------------------------------------------- the master --


def _last_line(text: bytes) -> str:
    lines = text.decode(errors="replace").strip().splitlines()
    return lines[-1][:500] if lines else ""


def run_trial(path: Path, timeout: float) -> TrialResult:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_THE_TRIAL}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service.server.rollout", str(path)],
            env=env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return TrialResult(ok=False, reason=f"trial did not finish within {timeout:g} s")
    try:
        return TrialResult.model_validate_json(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"code {done.returncode}"
        return TrialResult(
            ok=False, reason=f"trial process died ({how}): {_last_line(done.stderr)}"
        )


class Rollouts:
    """The master's side: one instance per master, living across SIGHUPs."""

    def __init__(self, trial_runner: Callable[[Path, float], TrialResult] = run_trial) -> None:
        self._run_trial = trial_runner
        self.pin: PinnedBundle | None = None
        self.shadow: PinnedBundle | None = None
        # After `make promote` on a server started with MODEL_VERSION: the
        # version a later SIGHUP rolls out (the operator chose it last).
        self._promoted: str | None = None

    def attempt(
        self,
        trigger: Trigger,
        metrics_dir: Path,
        log: Any,
        candidate: Path | None = None,
    ) -> RolloutAttempt:
        """Prove and pin `candidate`, or else MODEL_VERSION (or the newest version)."""
        settings = ServiceSettings(pinned_bundle=None)
        started = time.monotonic()
        path: Path | None = candidate
        try:
            if path is None:
                path = resolve_bundle_dir(
                    settings.model_dir,
                    settings.model_name,
                    self._promoted or settings.model_version,
                ).absolute()
            result = self._run_trial(path, settings.rollout_trial_timeout)
        except BundleError as exc:
            result = TrialResult(ok=False, reason=str(exc))
        version = result.version or (path.name if path else None)
        if result.ok and path is not None and result.version and result.manifest_sha256:
            self.pin = PinnedBundle(
                path=path, version=result.version, manifest_sha256=result.manifest_sha256
            )
            os.environ[PINNED_BUNDLE_VARIABLE] = self.pin.model_dump_json()
            log.info(
                "model rollout accepted (%s): %s %s from %s, backend %s, classes predicted %s, "
                "trial %.1f s",
                trigger,
                escape(settings.model_name),
                escape(version),
                escape(path),
                result.backend,
                escape(",".join(result.classes_predicted)),
                time.monotonic() - started,
            )
            attempt = RolloutAttempt(
                trigger=trigger,
                version=version,
                path=str(path),
                result="accepted",
                reason=None,
                time=now(),
            )
        else:
            log.error(
                "model rollout refused (%s), still serving %s: %s",
                trigger,
                escape(self.serving),
                escape(result.reason),
            )
            attempt = RolloutAttempt(
                trigger=trigger,
                version=version,
                path=str(path) if path else None,
                result="refused",
                reason=result.reason,
                time=now(),
            )
        try:
            record_attempt(metrics_dir, attempt)
        except OSError as exc:
            log.error("model rollout not recorded in %s: %s", escape(metrics_dir), escape(exc))
        return attempt

    @property
    def serving(self) -> str:
        return self.pin.version if self.pin else "nothing"

    # ------------------------------------------------------------ the shadow --

    def try_shadow(
        self, trigger: Trigger, version: str, metrics_dir: Path, log: Any
    ) -> tuple[bool, str]:
        """Prove `version` as a rollout would, check it fits the version serving,
        and pin it as the shadow; a refusal leaves the shadow (and the served
        version) as they were."""
        settings = ServiceSettings(pinned_bundle=None)
        started = time.monotonic()
        path: Path | None = None
        candidate: PinnedBundle | None = None
        try:
            path = resolve_bundle_dir(settings.model_dir, settings.model_name, version).absolute()
            if self.pin is None:
                raise BundleError(path, "shadow: nothing is serving to compare it with")
            result = self._run_trial(path, settings.rollout_trial_timeout)
            reason = result.reason
            if result.ok and result.version and result.manifest_sha256:
                candidate = PinnedBundle(
                    path=path, version=result.version, manifest_sha256=result.manifest_sha256
                )
                check_fit(self.pin, candidate)
        except (BundleError, ValueError) as exc:
            candidate, reason = None, str(exc)
        if candidate is None:
            line = (
                f"model shadow refused ({trigger}), serving {self.serving} untouched, "
                f"shadow {self.shadowing}: {reason}"
            )
            log.error("%s", escape(line))
            self._record_shadow(trigger, version, path, "refused", reason, metrics_dir, log)
            return False, line
        self.shadow = candidate
        os.environ[SHADOW_BUNDLE_VARIABLE] = candidate.model_dump_json()
        line = (
            f"model shadow accepted ({trigger}): {settings.model_name} {version} from {path} "
            f"scored beside {self.serving}, trial {time.monotonic() - started:.1f} s"
        )
        log.info("%s", escape(line))
        self._record_shadow(trigger, version, path, "accepted", None, metrics_dir, log)
        return True, line

    @property
    def shadowing(self) -> str:
        return self.shadow.version if self.shadow else "none"

    def clear_shadow(self, trigger: Trigger, reason: str, metrics_dir: Path, log: Any) -> str:
        shadow = self.shadow
        self.shadow = None
        os.environ.pop(SHADOW_BUNDLE_VARIABLE, None)
        line = (
            f"model shadow off ({trigger}): {shadow.version if shadow else 'none'}, {reason}; "
            f"serving {self.serving}"
        )
        log.info("%s", escape(line))
        self._record_shadow(
            trigger,
            shadow.version if shadow else None,
            shadow.path if shadow else None,
            "off",
            reason,
            metrics_dir,
            log,
        )
        return line

    def _record_shadow(
        self,
        trigger: Trigger,
        version: str | None,
        path: Path | None,
        result: Literal["accepted", "refused", "off"],
        reason: str | None,
        metrics_dir: Path,
        log: Any,
    ) -> None:
        decision = ShadowDecision(
            trigger=trigger,
            version=version,
            path=str(path) if path else None,
            result=result,
            reason=reason,
            shadowing=self.shadow.version if self.shadow else None,
            time=now(),
        )
        try:
            record_shadow(metrics_dir, decision)
        except OSError as exc:
            log.error("model shadow not recorded in %s: %s", escape(metrics_dir), escape(exc))

    def _shadow_still_fits(self, trigger: Trigger, metrics_dir: Path, log: Any) -> None:
        """After a new served version: a shadow that is now serving, or no
        longer fits it, stops being scored."""
        if self.shadow is None or self.pin is None:
            return
        try:
            check_fit(self.pin, self.shadow)
        except (BundleError, ValueError) as exc:
            self.clear_shadow(trigger, str(exc), metrics_dir, log)

    def promote(self, metrics_dir: Path, log: Any) -> tuple[bool, str]:
        """The shadow becomes the served version through a rollout, and stops being a shadow."""
        if self.shadow is None:
            line = f"promote refused, still serving {self.serving}: no shadow is being scored"
            log.error("%s", escape(line))
            return False, line
        shadow = self.shadow
        attempt = self.attempt("promote", metrics_dir, log, candidate=shadow.path)
        if attempt.result == "refused":
            return False, (
                f"promote refused, still serving {self.serving}, shadow {shadow.version} "
                f"kept: {attempt.reason}"
            )
        if ServiceSettings(pinned_bundle=None).model_version is not None:
            self._promoted = shadow.version
        self.clear_shadow("promote", "promoted to serve", metrics_dir, log)
        return True, f"promoted: serving {self.serving}, no shadow"

    # ------------------------------------------------------------ the hooks --

    def start(self, metrics_dir: Path, log: Any) -> None:
        os.environ.pop(SHADOW_BUNDLE_VARIABLE, None)
        if self.attempt("start", metrics_dir, log).result == "refused":
            # Nothing was ever served: failing fast beats workers with no model.
            raise SystemExit(NOTHING_TO_SERVE)
        version = ServiceSettings(pinned_bundle=None).shadow_model_version
        if version is not None:
            self.try_shadow("start", version, metrics_dir, log)

    def reload(self, metrics_dir: Path, log: Any) -> None:
        try:
            self._reload(metrics_dir, log)
        except Exception as exc:
            # An exception escaping a hook ends Gunicorn's main loop: the
            # master would exit. The pin, and so the serving version, stays.
            log.error("model rollout refused (sighup), internal error: %s", escape(repr(exc)))

    def _reload(self, metrics_dir: Path, log: Any) -> None:
        request_file = ServiceSettings(pinned_bundle=None).rollout_request_file
        request = take_request(request_file)
        if isinstance(request, str):
            log.error("%s", escape(request))
            request = None
        if request is None or request_file is None:
            if self.attempt("sighup", metrics_dir, log).result == "accepted":
                self._shadow_still_fits("sighup", metrics_dir, log)
            return
        if request.action == "shadow" and request.version is not None:
            ok, line = self.try_shadow("sighup", request.version, metrics_dir, log)
        elif request.action == "promote":
            ok, line = self.promote(metrics_dir, log)
        else:
            ok, line = True, self.clear_shadow("sighup", "switched off", metrics_dir, log)
        answer(request_file, request, ok, line)


ROLLOUTS = Rollouts()


if __name__ == "__main__":
    outcome = trial(Path(sys.argv[1]))
    sys.stdout.write(outcome.model_dump_json() + "\n")
    sys.exit(0 if outcome.ok else 2)
