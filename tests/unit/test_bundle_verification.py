"""Finding bundles, and refusing any that do not match their manifest."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from service.bundle import BundleError, resolve_bundle_dir, semver_key, verify_bundle
from service.predictor import load_predictor
from service.settings import ServiceSettings
from tests.support.bundles import Detonator, copy_bundle, model_sha256, rewrite_file


def test_semver_precedence_orders_prereleases_first() -> None:
    versions = ["1.0.0", "1.10.0", "1.2.0", "1.10.0-rc.1", "1.10.0-alpha", "0.9.9", "1.10.0-rc.10"]
    assert sorted(versions, key=semver_key) == [
        "0.9.9",
        "1.0.0",
        "1.2.0",
        "1.10.0-alpha",
        "1.10.0-rc.1",
        "1.10.0-rc.10",
        "1.10.0",
    ]


def test_newest_version_is_chosen_and_temporary_directories_ignored(
    model_dir: Path, bundle_path: Path
) -> None:
    copy_bundle(bundle_path, model_dir, version="1.10.0")
    copy_bundle(bundle_path, model_dir, version="1.9.0")
    (model_dir / "iris" / ".tmp-2.0.0-abc").mkdir()
    (model_dir / "iris" / "latest").mkdir()
    assert resolve_bundle_dir(model_dir, "iris", None).name == "1.10.0"
    assert resolve_bundle_dir(model_dir, "iris", "1.9.0").name == "1.9.0"


def test_missing_model_name_is_refused(model_dir: Path) -> None:
    with pytest.raises(BundleError, match=r"missing"):
        resolve_bundle_dir(model_dir, "wine", None)


def test_missing_version_is_refused(model_dir: Path) -> None:
    with pytest.raises(BundleError, match=r"2\.0\.0.*missing"):
        verify_bundle(resolve_bundle_dir(model_dir, "iris", "2.0.0"))


def test_missing_model_file_is_refused(bundle_path: Path) -> None:
    (bundle_path / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing: model.onnx"):
        verify_bundle(bundle_path)


def test_invalid_manifest_is_refused(bundle_path: Path) -> None:
    (bundle_path / "manifest.json").write_text('{"name": "iris"}')
    with pytest.raises(BundleError, match=r"invalid manifest"):
        verify_bundle(bundle_path)


def test_manifest_version_must_match_its_directory(model_dir: Path, bundle_path: Path) -> None:
    bundle_path.rename(model_dir / "iris" / "3.0.0")
    with pytest.raises(BundleError, match=r"does not match the directory"):
        verify_bundle(model_dir / "iris" / "3.0.0")


def test_tampered_joblib_is_refused_and_never_unpickled(bundle_path: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (bundle_path / "model.joblib").write_bytes(pickle.dumps(Detonator(marker)))
    with pytest.raises(BundleError, match=r"checksum mismatch: model.joblib") as refused:
        load_predictor(ServiceSettings(model_dir=bundle_path.parents[1], backend="sklearn"))
    assert str(bundle_path) in str(refused.value)
    assert not marker.exists()


def test_tampered_onnx_is_refused(bundle_path: Path) -> None:
    data = bytearray((bundle_path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch: model.onnx"):
        verify_bundle(bundle_path)


def test_corrupt_onnx_with_matching_checksum_is_unreadable(bundle_path: Path) -> None:
    rewrite_file(bundle_path, "model.onnx", b"not a protobuf", update_checksum=True)
    with pytest.raises(BundleError, match=r"unreadable: onnx model"):
        load_predictor(ServiceSettings(model_dir=bundle_path.parents[1]))


def test_sklearn_minor_version_mismatch_is_refused(bundle_path: Path) -> None:
    manifest_path = bundle_path / "manifest.json"
    text = manifest_path.read_text()
    import json

    manifest = json.loads(text)
    manifest["libraries"]["scikit_learn"] = "0.24.2"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"incompatible library version.*0.24.2"):
        load_predictor(
            ServiceSettings(
                model_dir=bundle_path.parents[1],
                backend="sklearn",
                trusted_model_sha256=model_sha256(bundle_path),
            )
        )


def test_onnx_backend_refused_for_an_sklearn_only_bundle(tmp_path: Path) -> None:
    from tests.support.bundles import train_bundle

    bundle = train_bundle(tmp_path, "--no-onnx", "--n-estimators", "5")
    with pytest.raises(BundleError, match=r"BACKEND=onnx but the bundle has no usable ONNX"):
        load_predictor(ServiceSettings(model_dir=tmp_path, backend="onnx"))
    with pytest.raises(BundleError, match=r"untrusted: model.joblib"):
        load_predictor(ServiceSettings(model_dir=tmp_path))
    predictor = load_predictor(
        ServiceSettings(model_dir=tmp_path, trusted_model_sha256=model_sha256(bundle))
    )
    assert predictor.backend.name == "sklearn"
    assert predictor.bundle_path == bundle
