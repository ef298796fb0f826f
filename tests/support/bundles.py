"""Bundles for tests, made by the real training CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
VIRGINICA = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}


class Detonator:
    """Unpickling this creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


def model_sha256(bundle: Path) -> str:
    """The digest an operator pins (outside MODEL_DIR) so this bundle's pickle may load."""
    return hashlib.sha256((bundle / "model.joblib").read_bytes()).hexdigest()


def pinned_digests(model_dir: Path) -> str:
    """TRUSTED_MODEL_SHA256 for every bundle under model_dir, as an operator pins them."""
    return ",".join(model_sha256(m.parent) for m in sorted(model_dir.rglob("model.joblib")))


def trusting(*bundles: Path) -> dict[str, str]:
    """Settings (as environment variables) that pin these bundles' native models."""
    return {"TRUSTED_MODEL_SHA256": ",".join(model_sha256(b) for b in bundles)}


def train_bundle(model_dir: Path, *args: str) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "training", "--output-dir", str(model_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def copy_bundle(source: Path, model_dir: Path, version: str | None = None) -> Path:
    """Copy a bundle into another model directory, optionally as another version."""
    target = model_dir / source.parent.name / (version or source.name)
    shutil.copytree(source, target)
    if version is not None:
        manifest_path = target / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["version"] = version
        manifest_path.write_text(json.dumps(manifest, indent=2))
    return target


def rewrite_file(bundle: Path, name: str, data: bytes, *, update_checksum: bool) -> None:
    (bundle / name).write_bytes(data)
    if update_checksum:
        manifest_path = bundle / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
        }
        manifest_path.write_text(json.dumps(manifest, indent=2))
