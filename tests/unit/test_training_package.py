"""`python -m training package` and regression fitting: what the bundle records, and
one clear line for each way the inputs can disagree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from service.manifest import Manifest
from tests.unit.test_training_cli import FAST, run

IRIS_NAMES = "sepal_length,sepal_width,petal_length,petal_width"


def manifest_of(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def article_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The article's model: a forest on unnamed iris columns, and a named reference CSV."""
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    work = tmp_path_factory.mktemp("article")
    iris = load_iris()
    model = RandomForestClassifier(n_estimators=10, random_state=0).fit(iris.data, iris.target)
    joblib.dump(model, work / "classifier.joblib")
    lines = [f"{IRIS_NAMES},species"]
    lines += [
        ",".join([*(f"{v:g}" for v in row), iris.target_names[t]])
        for row, t in zip(iris.data, iris.target, strict=True)
    ]
    (work / "iris.csv").write_text("\n".join(lines) + "\n")
    return work


def package(work: Path, *args: str | Path) -> Any:
    return run(
        "package",
        work / "classifier.joblib",
        "--version",
        "1.0.0",
        "--output-dir",
        work / "out",
        "--parity-random-rows",
        "300",
        *args,
    )


def test_the_article_model_packages_with_named_features_and_class_names(
    article_files: Path,
) -> None:
    result = package(
        article_files,
        "--name",
        "article",
        "--features",
        IRIS_NAMES,
        "--reference-data",
        article_files / "iris.csv",
        "--target",
        "species",
        "--force",
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    manifest = manifest_of(path)
    Manifest.model_validate(manifest)
    assert manifest["task"] == "classification"
    assert manifest["classes"] == ["setosa", "versicolor", "virginica"]
    assert [f["name"] for f in manifest["features"]] == IRIS_NAMES.split(",")
    assert manifest["backend"] == "onnx"
    assert manifest["parity"]["test_rows"] == 150
    assert manifest["metrics"]["evaluated_on"] == "reference"
    assert manifest["dataset"]["source"] == "csv:iris.csv"
    assert all(f["deciles"] for f in manifest["features"])
    assert "(classification): accuracy" in result.stdout


def test_without_reference_data_the_bundle_is_valid_and_has_no_drift_statistics(
    article_files: Path,
) -> None:
    result = package(article_files, "--name", "bare", "--features", IRIS_NAMES)
    assert result.returncode == 0, result.stderr
    manifest = Manifest.model_validate(manifest_of(Path(result.stdout.splitlines()[-1])))
    assert not manifest.has_reference_data
    assert manifest.metrics is None
    assert manifest.dataset is None
    assert manifest.classes == ["0", "1", "2"]
    assert manifest.backend == "onnx"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--features", "a,b,c,d", "--reference-data", "{work}/iris.csv", "--target", "species"],
            "feature names from --features and the reference data's columns differ "
            "(only in the first: ['a', 'b', 'c', 'd']; only in the second: "
            "['sepal_length', 'sepal_width', 'petal_length', 'petal_width'])",
        ),
        (["--features", "a,b,c"], "the model takes 4 features but --features names 3"),
        ([], "the model does not record its feature names"),
        (
            ["--features", "a,b,c,d", "--rename", "a=,b=c"],
            "unusable feature names (2): '' (renamed from 'a') is empty; "
            "'c' names more than one feature",
        ),
        (["--features", IRIS_NAMES, "--target", "species"], "--target is only meaningful"),
    ],
)
def test_disagreeing_inputs_are_one_error_line_naming_the_difference(
    article_files: Path, args: list[str], message: str
) -> None:
    args = [a.format(work=article_files) for a in args]
    result = package(article_files, "--name", "bad", *args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (article_files / "out" / "bad").exists()


def test_a_file_that_is_not_a_fitted_estimator_is_refused(tmp_path: Path) -> None:
    joblib.dump({"weights": [1, 2]}, tmp_path / "classifier.joblib")
    result = package(tmp_path, "--name", "x", "--features", "a")
    assert result.returncode == 1
    assert "holds a dict, not a fitted estimator" in result.stderr
    missing = run("package", tmp_path / "nope.joblib", "--name", "x", "--version", "1.0.0")
    assert missing.returncode == 1
    assert "no such file" in missing.stderr


def test_package_needs_name_and_version(tmp_path: Path) -> None:
    result = run("package", tmp_path / "m.joblib")
    assert result.returncode == 2
    assert "the following arguments are required: --name, --version" in result.stderr


@pytest.mark.parametrize("estimator", ["random_forest", "hist_gradient_boosting", "linear"])
def test_regression_fits_each_estimator_with_target_statistics(
    tmp_path: Path, estimator: str
) -> None:
    result = run(*FAST, "--dataset", "diabetes", "--estimator", estimator, "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = Manifest.model_validate(manifest_of(Path(result.stdout.splitlines()[-1])))
    assert manifest.task == "regression"
    assert manifest.classes is None
    assert manifest.target_statistics is not None
    assert manifest.metrics is not None
    assert manifest.metrics.r2 is not None
    assert manifest.parity.compared == "predictions"
    if manifest.backend == "onnx":
        assert manifest.parity.max_rel_diff is not None
        assert manifest.parity.max_rel_diff <= manifest.parity.tolerance
    else:
        assert manifest.parity.reason
    assert "(regression): R²" in result.stdout


def test_a_regression_csv_gets_a_numeric_target(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = ["size,age,price"] + [
        f"{s:.1f},{a},{3 * s - a:.2f}"
        for s, a in zip(rng.uniform(10, 90, 80), rng.integers(0, 30, 80), strict=True)
    ]
    (tmp_path / "homes.csv").write_text("\n".join(lines) + "\n")
    result = run(
        *FAST,
        "--csv",
        tmp_path / "homes.csv",
        "--target",
        "price",
        "--task",
        "regression",
        "--estimator",
        "linear",
        "--output-dir",
        tmp_path / "out",
    )
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(Path(result.stdout.splitlines()[-1]))
    assert manifest["backend"] == "onnx"
    assert manifest["metrics"]["r2"] > 0.99


def test_a_data_set_of_the_other_task_is_a_clear_error(tmp_path: Path) -> None:
    result = run(*FAST, "--dataset", "iris", "--task", "regression", "--output-dir", tmp_path)
    assert result.returncode == 1
    assert "data set 'iris' is for classification, not regression" in result.stderr


def test_a_text_column_of_numeric_codes_stays_a_category(tmp_path: Path) -> None:
    """The model's own encoder says which columns are text, even when they look numeric."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {"area": rng.uniform(10, 90, 90), "dept": rng.choice(["75", "69", "06"], 90)}
    )
    price = frame.area * 3 + (frame.dept == "75") * 50
    encode = ColumnTransformer([("dept", OneHotEncoder(), ["dept"])], remainder="passthrough")
    model = Pipeline([("encode", encode), ("model", LinearRegression())]).fit(frame, price)
    joblib.dump(model, tmp_path / "classifier.joblib")
    frame.assign(price=price).to_csv(tmp_path / "flats.csv", index=False)
    result = package(
        tmp_path, "--name", "flats", "--reference-data", tmp_path / "flats.csv", "--target", "price"
    )
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(Path(result.stdout.splitlines()[-1]))
    dept = next(f for f in manifest["features"] if f["name"] == "dept")
    assert dept["kind"] == "category"
    assert sorted(dept["categories"]) == ["06", "69", "75"]
    assert manifest["backend"] == "onnx"


def test_a_missing_reference_file_is_one_clear_line(article_files: Path) -> None:
    result = package(
        article_files, "--name", "x", "--features", IRIS_NAMES, "--reference-data", "nope.csv"
    )
    assert result.returncode == 1
    assert "cannot read nope.csv" in result.stderr


def test_fitting_a_csv_with_a_text_column_one_hot_encodes_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    lines = ["rooms,area,city,price"]
    for _ in range(200):
        rooms, area, city = rng.integers(1, 8), rng.uniform(20, 200), rng.choice(["a", "b", "c"])
        lines.append(
            f"{rooms},{area:.1f},{city},{12 * area + 50 * rooms + (city == 'a') * 400:.1f}"
        )
    (tmp_path / "flats.csv").write_text("\n".join(lines) + "\n")
    result = run(
        *FAST,
        "--csv",
        tmp_path / "flats.csv",
        "--target",
        "price",
        "--task",
        "regression",
        "--estimator",
        "linear",
        "--output-dir",
        tmp_path / "out",
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.splitlines()[-1])
    manifest = Manifest.model_validate(manifest_of(path))
    kinds = {f.name: f.kind for f in manifest.features}
    assert kinds == {"rooms": "number", "area": "number", "city": "category"}
    assert manifest.backend == "onnx"
    assert manifest.onnx is not None
    assert manifest.onnx.column_inputs == ["rooms", "area", "city"]
    model = joblib.load(path / "model.joblib")
    assert model.named_steps["encode"].transformers_[0][2] == ["city"]


def test_a_column_mixing_numbers_and_text_is_a_typo_not_a_category(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,y\n1,2,x\n2,oops,y\n3,4,x\n")
    result = run("--csv", tmp_path / "d.csv", "--target", "y", "--output-dir", tmp_path)
    assert result.returncode == 1
    assert "column 'b' is not numeric: 'oops' on line 3" in result.stderr
