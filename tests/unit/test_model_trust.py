"""No pickle is loaded unless its SHA-256 is pinned outside MODEL_DIR, whatever the bundle says."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.bundle import BundleError
from service.predictor import example_rows, load_predictor
from service.server.rollout import run_trial, trial
from service.settings import ServiceSettings
from tests.support.bundles import Detonator, model_sha256, rewrite_file


def plant_detonator(bundle: Path, marker: Path) -> str:
    """A malicious model.joblib with a recomputed manifest that asks for the sklearn backend."""
    rewrite_file(bundle, "model.joblib", pickle.dumps(Detonator(marker)), update_checksum=True)
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backend"] = "sklearn"
    manifest_path.write_text(json.dumps(manifest))
    return model_sha256(bundle)


@pytest.mark.parametrize("backend", [None, "sklearn"])
def test_a_malicious_model_with_a_valid_manifest_is_never_unpickled(
    bundle_path: Path, tmp_path: Path, backend: str | None
) -> None:
    original = model_sha256(bundle_path)
    marker = tmp_path / "unpickled"
    plant_detonator(bundle_path, marker)
    digests = tmp_path / "trusted" / "sha256sums"
    digests.parent.mkdir()
    digests.write_text(f"{original}  model.joblib\n")
    settings = ServiceSettings(
        model_dir=bundle_path.parents[1],
        backend=backend,
        trusted_model_sha256=original,
        trusted_digests_file=digests,
    )
    with pytest.raises(BundleError, match=r"untrusted: model.joblib has sha256 [0-9a-f]{64}"):
        load_predictor(settings)
    assert not marker.exists()


def test_the_throwaway_trial_never_unpickles_a_malicious_model(
    bundle_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"
    plant_detonator(bundle_path, marker)
    monkeypatch.setenv("MODEL_DIR", str(bundle_path.parents[1]))
    in_process = trial(bundle_path)
    in_subprocess = run_trial(bundle_path, timeout=120)
    assert not in_process.ok
    assert not in_subprocess.ok
    assert "untrusted: model.joblib" in (in_subprocess.reason or "")
    assert not marker.exists()


def test_the_detonator_is_real_once_an_operator_pins_it(bundle_path: Path, tmp_path: Path) -> None:
    # Proves the tests above would notice an unpickling: pinned, it does run.
    marker = tmp_path / "unpickled"
    digest = plant_detonator(bundle_path, marker)
    settings = ServiceSettings(model_dir=bundle_path.parents[1], trusted_model_sha256=digest)
    with pytest.raises(BundleError, match=r"unreadable: sklearn model"):
        load_predictor(settings)
    assert marker.exists()


def test_a_digest_pinned_in_a_sha256sum_file_lets_the_model_load(
    bundle_path: Path, tmp_path: Path
) -> None:
    digests = tmp_path / "etc" / "trusted-model-sha256"
    digests.parent.mkdir()
    digests.write_text(f"# written at build time\n{model_sha256(bundle_path)}  model.joblib\n")
    predictor = load_predictor(
        ServiceSettings(
            model_dir=bundle_path.parents[1], backend="sklearn", trusted_digests_file=digests
        )
    )
    probabilities = predictor.backend.predict(example_rows(predictor.manifest, 3))
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def test_a_digests_file_inside_the_model_dir_is_refused(model_dir: Path) -> None:
    with pytest.raises(ValidationError, match=r"inside MODEL_DIR"):
        ServiceSettings(model_dir=model_dir, trusted_digests_file=model_dir / "iris" / "sums")


def test_a_malformed_pinned_digest_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"not a SHA-256"):
        ServiceSettings(trusted_model_sha256="abc123")
