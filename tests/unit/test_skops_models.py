""".skops model files: refused until their extra types are confirmed, then kept as
skops in the bundle and loaded by skops' safe loader, with no digest pinned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.backends import load_backend
from service.bundle import BundleError, verify_bundle
from tests.support.bundles import rewrite_file
from tests.support.user_models import titanic_logistic_regression
from tests.unit.test_training_cli import run

skops_io = pytest.importorskip("skops.io")


@pytest.fixture(scope="module")
def skops_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("skops")
    user = titanic_logistic_regression()
    skops_io.dump(user.model, work / "titanic.skops")
    user.reference.dropna().to_csv(work / "reference.csv", index=False)
    return work


def package(work: Path, *args: str) -> tuple[int, str, str]:
    result = run(
        "package",
        work / "titanic.skops",
        "--name",
        "titanic",
        "--version",
        "1.0.0",
        "--output-dir",
        work / "models",
        "--reference-data",
        work / "reference.csv",
        "--target",
        "survived",
        "--parity-random-rows",
        "100",
        "--force",
        *args,
    )
    return result.returncode, result.stdout, result.stderr


def test_a_skops_file_is_refused_with_the_flag_that_confirms_its_types(skops_file: Path) -> None:
    needed = skops_io.get_untrusted_types(file=skops_file / "titanic.skops")
    assert needed  # numpy.dtype, at least
    code, _, stderr = package(skops_file)
    assert code == 1
    flag = f"--trust-skops-types {','.join(sorted(needed))}"
    assert f"pass {flag} (make package PACKAGE_ARGS='{flag}')" in stderr
    assert not (skops_file / "models" / "titanic").exists()


def test_a_confirmed_skops_file_is_kept_as_skops_and_served_with_nothing_pinned(
    skops_file: Path,
) -> None:
    needed = sorted(skops_io.get_untrusted_types(file=skops_file / "titanic.skops"))
    digests = skops_file / "etc" / "trusted-model-sha256"
    code, stdout, stderr = package(
        skops_file, "--trust-skops-types", ",".join(needed), "--trusted-digests-file", str(digests)
    )
    assert code == 0, stderr
    assert "nothing to pin" in stdout
    assert not digests.exists()
    bundle_path = skops_file / "models" / "titanic" / "1.0.0"
    assert sorted(p.name for p in bundle_path.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.skops",
    ]
    manifest = json.loads((bundle_path / "manifest.json").read_text())
    assert manifest["skops_trusted_types"] == needed
    assert manifest["libraries"]["skops"] is not None

    bundle = verify_bundle(bundle_path)
    # No trusted digests at all: skops' loader runs no code from the file.
    backend = load_backend(bundle, "sklearn", frozenset())
    user = titanic_logistic_regression()
    frame = user.x.dropna().head(20)
    rows = frame.assign(
        sex=[bundle.manifest.features[3].categories.index(v) for v in frame.sex],  # type: ignore[union-attr]
        embarked=[bundle.manifest.features[4].categories.index(v) for v in frame.embarked],  # type: ignore[union-attr]
    ).to_numpy(dtype=np.float64)
    np.testing.assert_allclose(backend.predict(rows), user.model.predict_proba(frame), atol=1e-9)


def test_a_bundle_asking_skops_to_trust_foreign_types_is_refused(
    skops_file: Path, tmp_path: Path
) -> None:
    needed = sorted(skops_io.get_untrusted_types(file=skops_file / "titanic.skops"))
    code, _, stderr = package(skops_file, "--trust-skops-types", ",".join(needed))
    assert code == 0, stderr
    bundle_path = skops_file / "models" / "titanic" / "1.0.0"
    manifest = json.loads((bundle_path / "manifest.json").read_text())
    manifest["skops_trusted_types"] = [*needed, "builtins.eval"]
    rewrite_file(bundle_path, "manifest.json", json.dumps(manifest).encode(), update_checksum=False)
    with pytest.raises(BundleError, match=r"asks to trust \['builtins.eval'\]"):
        load_backend(verify_bundle(bundle_path), "sklearn", frozenset())
