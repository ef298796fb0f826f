"""One training run from data to published bundle; the CLI is a thin shell around `train`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training import bundle_writer, features, fit, onnx_export
from training.datasets import Dataset, load_builtin, load_csv, model_name_from
from training.errors import TrainingError


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "iris"
    csv: Path | None = None  # when set, overrides `dataset`
    target: str | None = None
    name: str | None = None
    version: str = "1.0.0"
    output_dir: Path = Path("artifacts")
    n_estimators: int = 100
    max_depth: int | None = None
    random_state: int = 42
    test_size: float = 0.25
    min_accuracy: float = 0.9
    force: bool = False
    parity_random_rows: int = 5000
    parity_tolerance: float = 1e-5
    onnx: bool = True


def _stderr_warning(message: str) -> None:
    print(f"training: warning: {message}", file=sys.stderr)


def load(config: TrainConfig) -> Dataset:
    if config.csv is not None:
        if not config.target:
            raise TrainingError("--csv needs --target COLUMN")
        return load_csv(config.csv, config.target)
    return load_builtin(config.dataset)


def bundle_name(config: TrainConfig) -> str:
    if config.name is not None:
        return config.name
    if config.csv is not None:
        return model_name_from(config.csv.stem)
    return config.dataset


def train(config: TrainConfig, warn: Callable[[str], None] = _stderr_warning) -> Path:
    """Train, gate, export and publish; returns the bundle directory."""
    bundle_writer.check_version(config.version)
    name = bundle_writer.check_name(bundle_name(config))
    # Fail before loading sklearn or fitting anything; write_bundle checks again.
    target = bundle_writer.bundle_path(config.output_dir, name, config.version)
    bundle_writer.refuse_existing(target, config.force)
    data = load(config)

    fitted = fit.fit(
        data,
        n_estimators=config.n_estimators,
        max_depth=config.max_depth,
        random_state=config.random_state,
        test_size=config.test_size,
    )
    accuracy = float(fitted.metrics["accuracy"])
    if accuracy < config.min_accuracy:
        raise TrainingError(
            f"accuracy {accuracy:.4f} is below --min-accuracy {config.min_accuracy:.4f}; "
            "bundle not written"
        )

    if config.onnx:
        outcome = onnx_export.export(
            fitted.model,
            fitted.X_train,
            fitted.X_test,
            parity_random_rows=config.parity_random_rows,
            tolerance=config.parity_tolerance,
        )
    else:
        outcome = onnx_export.skipped("disabled by --no-onnx", config.parity_tolerance)
    if outcome.model_bytes is None:
        warn(f"writing an sklearn-only bundle (no model.onnx): {outcome.parity.reason}")

    files = {bundle_writer.MODEL_FILE_SKLEARN: bundle_writer.serialize_model(fitted.model)}
    if outcome.model_bytes is not None:
        files[bundle_writer.MODEL_FILE_ONNX] = outcome.model_bytes
    manifest = bundle_writer.build_manifest(
        name=name,
        version=config.version,
        data=data,
        model=fitted.model,
        # Bounds describe what the model was fitted on, so the training split.
        features=features.feature_specs(fitted.X_train, data.features),
        metrics=fitted.metrics,
        outcome=outcome,
        files=files,
    )
    bundle_writer.validate(manifest)
    return bundle_writer.write_bundle(
        config.output_dir, name, config.version, files, manifest, force=config.force
    )
