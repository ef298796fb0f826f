"""Assemble manifest.json, check it against the contract, and publish the bundle atomically."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import re
import secrets
import shutil
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets import Dataset
from training.errors import TrainingError
from training.onnx_export import OnnxOutcome

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
SCHEMA_VERSION = 1
MODEL_FILE_SKLEARN = "model.joblib"
MODEL_FILE_ONNX = "model.onnx"
MANIFEST_FILE = "manifest.json"


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


def _pattern(field: str) -> re.Pattern[str]:
    # Taken from the generated schema so training and service can never disagree.
    # ASCII: a Unicode digit in a version would pass `\d` but surprise everyone.
    return re.compile(schema()["properties"][field]["pattern"], re.ASCII)


def check_name(name: str) -> str:
    if not _pattern("name").match(name):
        raise TrainingError(
            f"invalid model name {name!r}: must match {schema()['properties']['name']['pattern']}"
        )
    return name


def check_version(version: str) -> str:
    if not _pattern("version").match(version):
        raise TrainingError(f"invalid version {version!r}: must be a semantic version like 1.0.0")
    return version


def library_versions(with_onnx: bool) -> dict[str, str | None]:
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


def file_entries(files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
        for name, data in files.items()
    }


def build_manifest(
    *,
    name: str,
    version: str,
    data: Dataset,
    model: Any,
    features: list[dict[str, Any]],
    metrics: dict[str, float | int],
    outcome: OnnxOutcome,
    files: dict[str, bytes],
) -> dict[str, Any]:
    has_onnx = outcome.model_bytes is not None
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "dataset": {"source": data.source, "target": data.target, "n_rows": len(data.y)},
        "libraries": library_versions(has_onnx),
        "estimator": {
            "class_name": type(model).__name__,
            "module": type(model).__module__,
            "params": json_safe(model.get_params()),
        },
        "features": features,
        "classes": list(data.class_names),
        "metrics": metrics,
        "parity": outcome.parity.as_dict(),
        "onnx": outcome.info,
        "backend": "onnx" if has_onnx else "sklearn",
        "files": file_entries(files),
    }


def validate(manifest: dict[str, Any]) -> None:
    """Schema check plus the cross-field rules of service/manifest.py the schema cannot say."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(
        schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<root>"
        raise TrainingError(f"manifest fails {SCHEMA_PATH.name} at {where}: {error.message}")
    problems = _invariant_problems(manifest)
    if problems:
        raise TrainingError("manifest is inconsistent: " + "; ".join(problems))


def _invariant_problems(m: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for f in m["features"]:
        if f["deciles"] != sorted(f["deciles"]):
            problems.append(f"feature {f['name']!r}: deciles must be non-decreasing")
        if f["training_min"] > f["training_max"]:
            problems.append(f"feature {f['name']!r}: training_min exceeds training_max")
        for a, b in (("minimum", "exclusive_minimum"), ("maximum", "exclusive_maximum")):
            if f.get(a) is not None and f.get(b) is not None:
                problems.append(f"feature {f['name']!r}: set {a} or {b}, not both")
    names = [f["name"] for f in m["features"]]
    if len(set(names)) != len(names):
        problems.append("feature names must be unique")
    if len(set(m["classes"])) != len(m["classes"]):
        problems.append("class names must be unique")
    if MODEL_FILE_SKLEARN not in m["files"]:
        problems.append(f"files must list {MODEL_FILE_SKLEARN}")
    has_onnx = MODEL_FILE_ONNX in m["files"]
    if m["backend"] == "onnx" and not (has_onnx and m["onnx"] and m["parity"]["passed"]):
        problems.append(
            "backend 'onnx' needs model.onnx, its onnx section and a passed parity gate"
        )
    if has_onnx != (m.get("onnx") is not None):
        problems.append("model.onnx and the onnx section come together")
    return problems


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
