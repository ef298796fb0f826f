"""Assemble manifest.json, check it against the contract, and publish the bundle atomically."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from service.manifest import (
    MANIFEST_FILE,
    MODEL_FILE_ONNX,
    MODEL_FILE_SKLEARN,
    MODEL_FILE_SKOPS,
    NAME_PATTERN,
    NAME_RE,
    SCHEMA_VERSION,
    SEMVER_RE,
    Manifest,
)
from training.datasets import Dataset
from training.errors import TrainingError
from training.onnx_export import OnnxOutcome

__all__ = ["MANIFEST_FILE", "MODEL_FILE_ONNX", "MODEL_FILE_SKLEARN", "MODEL_FILE_SKOPS"]


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise TrainingError(f"invalid model name {name!r}: must match {NAME_PATTERN}")
    return name


def check_version(version: str) -> str:
    if not SEMVER_RE.match(version):
        raise TrainingError(f"invalid version {version!r}: must be a semantic version like 1.0.0")
    return version


def library_versions(
    with_onnx: bool, boosting: set[str], skops: bool = False
) -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def required(dist: str) -> str:
        return version(dist) or "unknown"

    # ONNX libraries are recorded only when the bundle actually carries an ONNX
    # model; otherwise nothing in the bundle depends on them.
    return {
        "python": platform.python_version(),
        "numpy": required("numpy"),
        "scikit_learn": required("scikit-learn"),
        "joblib": required("joblib"),
        "skl2onnx": version("skl2onnx") if with_onnx else None,
        "onnx": version("onnx") if with_onnx else None,
        "onnxruntime": version("onnxruntime") if with_onnx else None,
        "onnxmltools": version("onnxmltools") if with_onnx and boosting else None,
        "xgboost": version("xgboost") if "xgboost" in boosting else None,
        "lightgbm": version("lightgbm") if "lightgbm" in boosting else None,
        "skops": version("skops") if skops else None,
    }


def json_safe(value: Any) -> Any:
    """Estimator params as JSON: numpy scalars unwrapped, anything exotic as its repr."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else repr(value)
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [json_safe(v) for v in value]
    return repr(value)


def serialize_model(model: Any) -> bytes:
    import joblib

    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    return buffer.getvalue()


def native_model_files(model: Any, skops_trusted_types: list[str] | None) -> dict[str, bytes]:
    """model.joblib, or model.skops for a model given as skops: the bundle then
    holds no pickle, and its loader needs exactly the types the user confirmed."""
    if skops_trusted_types is None:
        return {MODEL_FILE_SKLEARN: serialize_model(model)}
    import skops.io

    data: bytes = skops.io.dumps(model)
    extra = sorted(set(skops.io.get_untrusted_types(data=data)) - set(skops_trusted_types))
    if extra:
        raise TrainingError(f"the model written as skops needs types nobody confirmed: {extra}")
    return {MODEL_FILE_SKOPS: data}


def file_entries(files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
        for name, data in files.items()
    }


def build_manifest(
    *,
    name: str,
    version: str,
    data: Dataset | None,
    model: Any,
    task: str,
    features: list[dict[str, Any]],
    classes: list[str] | None,
    target_statistics: dict[str, Any] | None,
    prediction_shares: list[float] | None,
    metrics: dict[str, Any] | None,
    outcome: OnnxOutcome,
    files: dict[str, bytes],
    skops_trusted_types: list[str] | None = None,
) -> dict[str, Any]:
    has_onnx = outcome.model_bytes is not None
    steps = [model, *(step for _, step in getattr(model, "steps", []))]
    boosting = {type(s).__module__.split(".")[0] for s in steps} & {"xgboost", "lightgbm"}
    dataset = None
    if data is not None:
        dataset = {"source": data.source, "target": data.target, "n_rows": len(data.X)}
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "task": task,
        "dataset": dataset,
        "libraries": library_versions(has_onnx, boosting, skops_trusted_types is not None),
        "estimator": {
            "class_name": type(model).__name__,
            "module": type(model).__module__,
            "params": json_safe(model.get_params(deep=False)),
        },
        "features": features,
        "classes": classes,
        "target_statistics": target_statistics,
        "prediction_shares": prediction_shares,
        "metrics": metrics,
        "parity": outcome.parity.as_dict(),
        "onnx": outcome.info,
        "backend": "onnx" if has_onnx else "sklearn",
        "files": file_entries(files),
        "skops_trusted_types": skops_trusted_types,
    }


def validate(manifest: dict[str, Any]) -> Manifest:
    """Validate with the manifest model itself: the same rules the service applies."""
    try:
        return Manifest.model_validate(manifest)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = "/".join(str(p) for p in first["loc"]) or "<root>"
        raise TrainingError(f"manifest is invalid at {where}: {first['msg']}") from None


def bundle_path(output_dir: Path, name: str, version: str) -> Path:
    return output_dir / name / version


def refuse_existing(path: Path, force: bool) -> None:
    if not force and (path.exists() or path.is_symlink()):
        raise TrainingError(f"{path} already exists; pass --force to replace it")


def write_bundle(
    output_dir: Path,
    name: str,
    version: str,
    files: dict[str, bytes],
    manifest: dict[str, Any],
    *,
    force: bool,
) -> Path:
    """Write into a hidden temp dir beside the target, then rename it into place.

    The service scans DIR/<name>/ for semver-named directories, so a reader sees
    either no bundle or a complete one, never a half-written one.
    """
    final = bundle_path(output_dir, name, version)
    refuse_existing(final, force)
    manifest_bytes = _manifest_bytes(manifest)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"cannot create {parent}: {exc.strerror or exc}") from None
    # The leading dot keeps the name from ever matching the semver pattern.
    tmp = parent / f".tmp-{version}-{secrets.token_hex(6)}"
    try:
        tmp.mkdir()
        payload = {**files, MANIFEST_FILE: manifest_bytes}
        for filename, content in payload.items():
            _write_synced(tmp / filename, content)
        _fsync_dir(tmp)
        _publish(tmp, final, force)
    except OSError as exc:
        raise TrainingError(f"cannot write bundle {final}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # Durability of the rename only: the bundle is already in place either way.
    with contextlib.suppress(OSError):
        _fsync_dir(parent)
    return final


def _publish(tmp: Path, final: Path, force: bool) -> None:
    if not (final.exists() or final.is_symlink()):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            # Someone published the same version meanwhile; fall through.
            if not (final.exists() or final.is_symlink()):
                raise
    if not force:
        raise TrainingError(f"{final} already exists; pass --force to replace it")
    old = final.parent / f".old-{final.name}-{secrets.token_hex(6)}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)  # put the previous bundle back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    # allow_nan=False: NaN is not JSON, and a reader other than Python would choke.
    try:
        text = json.dumps(manifest, indent=2, allow_nan=False)
    except ValueError as exc:
        raise TrainingError(f"manifest holds a non-finite number: {exc}") from None
    return (text + "\n").encode("utf-8")


def _write_synced(path: Path, content: bytes) -> None:
    with path.open("xb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
