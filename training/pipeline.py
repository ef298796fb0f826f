"""One training run from data to published bundle; the CLI is a thin shell around `train`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from service.manifest import Task
from training import bundle_writer, features, fit, onnx_export
from training.datasets import BUILTIN_TASKS, Dataset, load_builtin, load_csv, model_name_from
from training.errors import TrainingError

Warn = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "iris"
    csv: Path | None = None  # when set, overrides `dataset`
    target: str | None = None
    task: Task | None = None  # default: the built-in data set's, or classification
    estimator: str = "random_forest"
    name: str | None = None
    version: str = "1.0.0"
    output_dir: Path = Path("artifacts")
    n_estimators: int = 100
    max_depth: int | None = None
    random_state: int = 42
    test_size: float = 0.25
    min_accuracy: float = 0.9
    min_r2: float = 0.0
    force: bool = False
    parity_random_rows: int = 5000
    parity_tolerance: float | None = None  # default: per task
    onnx: bool = True

    @property
    def resolved_task(self) -> Task:
        if self.task is not None:
            return self.task
        return "classification" if self.csv is not None else BUILTIN_TASKS[self.dataset]


@dataclass(frozen=True)
class Publication:
    """Everything a bundle needs besides the ONNX outcome, from fitting or packaging."""

    name: str
    version: str
    output_dir: Path
    force: bool
    model: Any
    task: Task
    inputs: onnx_export.ModelInput
    data: Dataset | None
    specs: list[dict[str, Any]]
    classes: list[str] | None
    target_statistics: dict[str, Any] | None
    metrics: dict[str, Any] | None
    parity_rows: NDArray[Any]
    # The rows the reference statistics describe; the model's predictions on
    # them are the baseline of prediction drift.
    reference_rows: NDArray[Any] | None
    # A model given as a .skops file is kept as one (loaded with these types).
    skops_trusted_types: list[str] | None = None


def _stderr_warning(message: str) -> None:
    print(f"training: warning: {message}", file=sys.stderr)


def load(config: TrainConfig) -> Dataset:
    task = config.resolved_task
    if config.csv is not None:
        if not config.target:
            raise TrainingError("--csv needs --target COLUMN")
        return load_csv(config.csv, config.target, task)
    if BUILTIN_TASKS[config.dataset] != task:
        raise TrainingError(
            f"data set {config.dataset!r} is for {BUILTIN_TASKS[config.dataset]}, not {task}"
        )
    return load_builtin(config.dataset)


def bundle_name(config: TrainConfig) -> str:
    if config.name is not None:
        return config.name
    if config.csv is not None:
        return model_name_from(config.csv.stem)
    return config.dataset


def publish(
    bundle: Publication,
    *,
    onnx: bool,
    parity_random_rows: int,
    tolerance: float | None,
    warn: Warn,
) -> Path:
    """Convert and gate ONNX, build and validate the manifest, write the bundle."""
    tolerance = onnx_export.DEFAULT_TOLERANCE[bundle.task] if tolerance is None else tolerance
    if onnx:
        outcome = onnx_export.export(
            bundle.model,
            bundle.inputs,
            bundle.task,
            bundle.specs,
            bundle.parity_rows,
            parity_random_rows=parity_random_rows,
            tolerance=tolerance,
        )
    else:
        outcome = onnx_export.skipped("disabled by --no-onnx", tolerance, bundle.task)
    if outcome.model_bytes is None:
        warn(f"writing an sklearn-only bundle (no model.onnx): {outcome.parity.reason}")

    prediction_shares = None
    if bundle.reference_rows is not None and len(bundle.reference_rows):
        outputs = onnx_export.sklearn_outputs(
            bundle.model, bundle.inputs.for_sklearn(bundle.reference_rows), bundle.task
        )
        prediction_shares = features.prediction_shares(
            outputs, bundle.classes, bundle.target_statistics
        )
    files = bundle_writer.native_model_files(bundle.model, bundle.skops_trusted_types)
    if outcome.model_bytes is not None:
        files[bundle_writer.MODEL_FILE_ONNX] = outcome.model_bytes
    manifest = bundle_writer.build_manifest(
        name=bundle.name,
        version=bundle.version,
        data=bundle.data,
        model=bundle.model,
        task=bundle.task,
        features=bundle.specs,
        classes=bundle.classes,
        target_statistics=bundle.target_statistics,
        prediction_shares=prediction_shares,
        metrics=bundle.metrics,
        outcome=outcome,
        files=files,
        skops_trusted_types=bundle.skops_trusted_types,
    )
    bundle_writer.validate(manifest)
    return bundle_writer.write_bundle(
        bundle.output_dir, bundle.name, bundle.version, files, manifest, force=bundle.force
    )


def _check_quality(config: TrainConfig, task: Task, metrics: dict[str, Any]) -> None:
    if task == "classification":
        value, gate, flag, label = (
            metrics["accuracy"],
            config.min_accuracy,
            "--min-accuracy",
            "accuracy",
        )
    else:
        value, gate, flag, label = metrics["r2"], config.min_r2, "--min-r2", "R²"
    if value < gate:
        raise TrainingError(f"{label} {value:.4f} is below {flag} {gate:.4f}; bundle not written")


def train(config: TrainConfig, warn: Warn = _stderr_warning) -> Path:
    """Train, gate, export and publish; returns the bundle directory."""
    bundle_writer.check_version(config.version)
    name = bundle_writer.check_name(bundle_name(config))
    # Fail before loading sklearn or fitting anything; write_bundle checks again.
    target = bundle_writer.bundle_path(config.output_dir, name, config.version)
    bundle_writer.refuse_existing(target, config.force)
    task = config.resolved_task
    data = load(config)

    fitted = fit.fit(
        data,
        estimator=config.estimator,
        n_estimators=config.n_estimators,
        max_depth=config.max_depth,
        random_state=config.random_state,
        test_size=config.test_size,
    )
    _check_quality(config, task, fitted.metrics)
    bundle = Publication(
        name=name,
        version=config.version,
        output_dir=config.output_dir,
        force=config.force,
        model=fitted.model,
        task=task,
        inputs=fitted.inputs,
        data=data,
        # Bounds describe what the model was fitted on, so the training split.
        specs=features.feature_specs(fitted.X_train, data.features),
        classes=list(data.class_names) if data.class_names is not None else None,
        target_statistics=(
            features.target_statistics(fitted.y_train) if task == "regression" else None
        ),
        metrics=fitted.metrics,
        parity_rows=fitted.X_test,
        reference_rows=fitted.X_train,
    )
    return publish(
        bundle,
        onnx=config.onnx,
        parity_random_rows=config.parity_random_rows,
        tolerance=config.parity_tolerance,
        warn=warn,
    )
