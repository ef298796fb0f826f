"""The bundle on disk: layout, checksums, schema validity, gates and atomic publication."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import joblib
import jsonschema
import pytest

from training import bundle_writer
from training.errors import TrainingError
from training.pipeline import TrainConfig, train

SCHEMA = json.loads((Path(__file__).parents[2] / "training" / "manifest.schema.json").read_text())


def fast(tmp_path: Path, **overrides: Any) -> TrainConfig:
    """Small forest and few probes: these tests pin behaviour, not model quality."""
    settings: dict[str, Any] = {"n_estimators": 10, "parity_random_rows": 500, "min_accuracy": 0.0}
    return TrainConfig(output_dir=tmp_path, **(settings | overrides))


def manifest_of(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return loaded


def leftovers(directory: Path) -> list[str]:
    """Hidden temp or aside directories that a finished run must not leave behind."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def iris_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(fast(tmp_path_factory.mktemp("artifacts")))


def test_bundle_layout_is_name_version_with_three_files(iris_bundle: Path) -> None:
    assert iris_bundle.parts[-2:] == ("iris", "1.0.0")
    assert sorted(p.name for p in iris_bundle.iterdir()) == [
        "manifest.json",
        "model.joblib",
        "model.onnx",
    ]
    assert leftovers(iris_bundle.parent) == []


def test_checksums_and_sizes_match_the_files(iris_bundle: Path) -> None:
    files = manifest_of(iris_bundle)["files"]
    assert set(files) == {"model.joblib", "model.onnx"}
    for name, entry in files.items():
        content = (iris_bundle / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
        assert entry["size_bytes"] == len(content)


def test_manifest_validates_against_the_generated_schema(iris_bundle: Path) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest_of(iris_bundle))


def test_manifest_is_accepted_by_the_service_contract(iris_bundle: Path) -> None:
    # Tests may import both sides; the training package itself never imports service.
    from service.manifest import Manifest

    manifest = Manifest.model_validate_json((iris_bundle / "manifest.json").read_text())
    assert manifest.backend == "onnx"
    assert manifest.feature_names == ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def test_manifest_records_dataset_estimator_metrics_and_versions(iris_bundle: Path) -> None:
    m = manifest_of(iris_bundle)
    assert m["schema_version"] == 3
    assert m["task"] == "classification"
    assert m["name"] == "iris"
    assert m["version"] == "1.0.0"
    assert m["created_at"].endswith("Z")
    assert m["dataset"] == {"source": "sklearn:iris", "target": "species", "n_rows": 150}
    assert m["classes"] == ["setosa", "versicolor", "virginica"]
    assert m["estimator"]["class_name"] == "RandomForestClassifier"
    assert m["estimator"]["module"].startswith("sklearn.ensemble")
    assert m["estimator"]["params"]["n_estimators"] == 10
    assert m["estimator"]["params"]["random_state"] == 42
    assert m["metrics"]["n_train"] + m["metrics"]["n_rows"] == 150
    assert m["metrics"]["n_rows"] == 38
    assert m["metrics"]["evaluated_on"] == "held_out"
    assert m["metrics"]["test_size"] == 0.25
    assert 0 <= m["metrics"]["f1_macro"] <= 1
    # Recorded only for such models (and skops only for a model kept as skops).
    optional = {"onnxmltools", "xgboost", "lightgbm", "skops"}
    assert all(m["libraries"][k] for k in m["libraries"] if k not in optional)
    assert m["libraries"]["skops"] is None
    assert m["features"][0]["exclusive_minimum"] == 0.0


def test_joblib_model_loads_and_predicts_every_class(iris_bundle: Path) -> None:
    model = joblib.load(iris_bundle / "model.joblib")
    assert model.classes_.tolist() == [0, 1, 2]
    assert model.n_features_in_ == 4


def test_csv_end_to_end_bundle_uses_the_file_stem_and_string_classes(tmp_path: Path) -> None:
    lines = ["length (mm),colour score,kind"]
    for i in range(30):
        lines.append(f"{10 + i % 5},{-3 + i % 3},small")
        lines.append(f"{50 + i % 5},{5 + i % 3},large")
    csv_path = tmp_path / "Fish Data.csv"
    csv_path.write_text("\n".join(lines) + "\n")

    path = train(fast(tmp_path / "out", csv=csv_path, target="kind"))
    m = manifest_of(path)
    assert path == tmp_path / "out" / "fish_data" / "1.0.0"
    assert m["dataset"]["source"] == "csv:Fish Data.csv"
    assert m["classes"] == ["large", "small"]
    assert [(f["name"], f["unit"]) for f in m["features"]] == [
        ("length", "mm"),
        ("colour_score", None),
    ]
    assert m["features"][1]["minimum"] < -3  # negative column: ten spans below
    jsonschema.Draft202012Validator(SCHEMA).validate(m)


def test_accuracy_gate_failure_raises_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"^accuracy 0\.\d{4} is below --min-accuracy 1\.0000"):
        train(fast(tmp_path, max_depth=1, n_estimators=1, min_accuracy=1.0))
    assert list(tmp_path.iterdir()) == []


def test_existing_version_is_refused_without_force(tmp_path: Path) -> None:
    first = train(fast(tmp_path))
    before = (first / "manifest.json").read_bytes()
    with pytest.raises(TrainingError, match="already exists; pass --force to replace it"):
        train(fast(tmp_path, random_state=1))
    assert (first / "manifest.json").read_bytes() == before
    assert leftovers(first.parent) == []


def test_force_replaces_the_existing_version_and_leaves_nothing_aside(tmp_path: Path) -> None:
    first = train(fast(tmp_path, random_state=1))
    (first / "stray.txt").write_text("from the old bundle")
    second = train(fast(tmp_path, random_state=2, force=True))
    assert second == first
    assert manifest_of(second)["estimator"]["params"]["random_state"] == 2
    assert not (second / "stray.txt").exists()
    assert sorted(p.name for p in second.parent.iterdir()) == ["1.0.0"]


def test_force_puts_the_old_bundle_back_if_the_new_one_cannot_be_renamed_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = train(fast(tmp_path, random_state=1))
    before = (first / "manifest.json").read_bytes()
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(TrainingError, match="No space left on device"):
        train(fast(tmp_path, random_state=2, force=True))
    assert (first / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in first.parent.iterdir()) == ["1.0.0"]


def test_failure_while_writing_removes_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fail_on_second_file(path: Path, content: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        path.write_bytes(content)

    monkeypatch.setattr(bundle_writer, "_write_synced", fail_on_second_file)
    with pytest.raises(TrainingError, match="Input/output error"):
        train(fast(tmp_path))
    assert calls[0].parent.name.startswith(".tmp-1.0.0-")
    assert list((tmp_path / "iris").iterdir()) == []


def test_temp_dir_name_is_never_a_semantic_version(tmp_path: Path) -> None:
    import re

    seen: list[str] = []
    real_publish = bundle_writer._publish

    def spy(tmp: Path, final: Path, force: bool) -> None:
        seen.append(tmp.name)
        real_publish(tmp, final, force)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bundle_writer, "_publish", spy)
        train(fast(tmp_path))
    assert len(seen) == 1
    assert seen[0].startswith(".tmp-1.0.0-")
    assert not re.match(SCHEMA["properties"]["version"]["pattern"], seen[0])
    assert leftovers(tmp_path / "iris") == []


def test_invalid_manifest_is_rejected_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = bundle_writer.build_manifest

    def bad_build(**kwargs: Any) -> dict[str, Any]:
        manifest = real_build(**kwargs)
        manifest["features"][0]["name"] = "not\na name"
        return manifest

    monkeypatch.setattr(bundle_writer, "build_manifest", bad_build)
    with pytest.raises(TrainingError, match=r"manifest is invalid at features/0/number/name"):
        train(fast(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(backend="onnx", onnx=None), "backend 'onnx' needs model.onnx"),
        (lambda m: m["files"].pop("model.joblib"), "files must list model.joblib"),
        (lambda m: m["features"][0].update(minimum=0.0), "set minimum or exclusive_minimum"),
        (lambda m: m["features"][0]["deciles"].reverse(), "deciles must be non-decreasing"),
        (lambda m: m.update(classes=["a", "a"]), "class names must be unique"),
    ],
)
def test_cross_field_rules_the_schema_cannot_express_are_enforced(
    iris_bundle: Path, mutate: Any, message: str
) -> None:
    manifest = manifest_of(iris_bundle)
    bundle_writer.validate(manifest)  # the real one is consistent
    mutate(manifest)
    with pytest.raises(TrainingError, match=message):
        bundle_writer.validate(manifest)


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "01.0.0", "1.0.0/..", "\u0661.0.0"])
def test_invalid_versions_are_rejected(version: str) -> None:
    with pytest.raises(TrainingError, match="invalid version"):
        bundle_writer.check_version(version)


@pytest.mark.parametrize("version", ["1.0.0", "2.10.3-rc.1", "1.0.0+build.5"])
def test_semantic_versions_are_accepted(version: str) -> None:
    assert bundle_writer.check_version(version) == version


@pytest.mark.parametrize("name", ["Iris", "1iris", "../x", "", "a" * 65])
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(TrainingError, match="invalid model name"):
        bundle_writer.check_name(name)


def test_too_few_rows_per_class_for_a_stratified_split_is_a_clear_error(tmp_path: Path) -> None:
    csv_path = tmp_path / "tiny.csv"
    csv_path.write_text("a,y\n1,x\n2,x\n3,y\n")
    with pytest.raises(TrainingError, match=r"cannot split 3 rows"):
        train(fast(tmp_path / "out", csv=csv_path, target="y"))
    assert not (tmp_path / "out").exists()
