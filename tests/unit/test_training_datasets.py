"""Loading data: feature naming, units, CSV parsing and its error messages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from training.datasets import feature_info, feature_infos, load_builtin, load_csv, model_name_from
from training.errors import TrainingError

FEATURE_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_iris_features_get_identifier_names_units_and_original_wording() -> None:
    data = load_builtin("iris")
    assert [f.name for f in data.features] == [
        "sepal_length",
        "sepal_width",
        "petal_length",
        "petal_width",
    ]
    assert {f.unit for f in data.features} == {"cm"}
    assert data.features[0].description == "Sepal length (cm)"
    assert data.class_names == ["setosa", "versicolor", "virginica"]
    assert data.source == "sklearn:iris"
    assert data.X.dtype == np.float64
    assert data.X.shape == (150, 4)
    assert data.y is not None
    assert data.y.tolist() == sorted(data.y.tolist())  # iris is ordered by class
    assert set(data.y.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    ("dataset", "raw_index", "expected"),
    [
        ("wine", 11, "od280_od315_of_diluted_wines"),
        ("wine", 0, "alcohol"),
        ("breast_cancer", 0, "mean_radius"),
        ("breast_cancer", 27, "worst_concave_points"),
    ],
)
def test_builtin_feature_names_are_sanitised_to_identifiers(
    dataset: str, raw_index: int, expected: str
) -> None:
    data = load_builtin(dataset)
    names = [f.name for f in data.features]
    assert names[raw_index] == expected
    assert all(re.match(FEATURE_NAME, n) for n in names)
    assert len(set(names)) == len(names)
    assert all(f.unit is None for f in data.features)


def test_feature_name_without_unit_keeps_null_unit_and_collapses_separators() -> None:
    info = feature_info("  blood -- pressure / systolic ")
    assert info.name == "blood_pressure_systolic"
    assert info.unit is None
    assert info.description == "Blood -- pressure / systolic"


def test_feature_name_with_unit_and_leading_digit() -> None:
    info = feature_info("2nd reading (mm Hg)")
    assert info.name == "f_2nd_reading"
    assert info.unit == "mm Hg"


def test_feature_names_colliding_after_sanitising_are_an_error() -> None:
    with pytest.raises(TrainingError, match="both become feature name 'a_b'"):
        feature_infos(["a b", "a-b"])


def test_feature_name_with_no_usable_characters_is_an_error() -> None:
    with pytest.raises(TrainingError, match="cannot be made into a feature name"):
        feature_info("%%%")


def test_feature_name_longer_than_64_characters_is_an_error() -> None:
    with pytest.raises(TrainingError, match="cannot be made into a feature name"):
        feature_info("x" * 65)


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("Flowers 2024", "flowers_2024"),
        ("2024-data", "model_2024-data"),
        ("???", "model"),
        ("A" * 80, "a" * 64),
    ],
)
def test_default_name_from_csv_stem_matches_the_name_pattern(stem: str, expected: str) -> None:
    assert model_name_from(stem) == expected


def test_csv_with_header_and_string_target_encodes_sorted_classes(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "My Pets.csv",
        "weight (kg),height,species\n4.0,25,cat\n30.5,60,dog\n0.1,5,bird\n5.0,27,cat\n\n",
    )
    data = load_csv(path, "species")
    assert data.class_names == ["bird", "cat", "dog"]
    assert data.y is not None
    assert data.y.tolist() == [1, 2, 0, 1]
    assert data.X.tolist() == [[4.0, 25.0], [30.5, 60.0], [0.1, 5.0], [5.0, 27.0]]
    assert [(f.name, f.unit) for f in data.features] == [("weight", "kg"), ("height", None)]
    assert data.source == "csv:My Pets.csv"
    assert data.target == "species"


def test_csv_target_column_may_be_in_the_middle_and_numeric(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "a,label,b\n1,1,2\n3,0,4\n")
    data = load_csv(path, "label")
    assert data.class_names == ["0", "1"]
    assert data.X.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert data.y is not None
    assert data.y.tolist() == [1, 0]


def test_csv_with_byte_order_mark_reads_the_first_header_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffx,y\n1,a\n2,b\n".encode())
    assert [f.name for f in load_csv(path, "y").features] == ["x"]


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        ("a,b,y\n1,oops,c1\n2,3,c2\n", "y", "column 'b' is not numeric: 'oops' on line 2"),
        ("a,b,y\n1,,c1\n2,3,c2\n", "y", "column 'b' has a missing value on line 2"),
        ("a,b,y\n1,NA,c1\n2,3,c2\n", "y", "column 'b' has a missing value on line 2"),
        ("a,b,y\n1,inf,c1\n2,3,c2\n", "y", "column 'b' has a non-finite value"),
        ("a,b,y\n1,2,c1\n2,3,c2\n", "label", "target column 'label' is not in the header"),
        ("a,b,y\n1,2,c1\n2,3,c1\n", "y", "only one class"),
        ("a,b,y\n1,2,\n2,3,c1\n", "y", "target column 'y' has a missing value on line 2"),
        ("a,b,y\n1,2\n", "y", "line 2 has 2 fields, the header has 3"),
        ("a,y,y\n1,2,3\n", "y", "duplicate column names"),
        ("y\nc1\nc2\n", "y", "no feature columns"),
        ("a,y\n", "y", "no data rows"),
        ("", "y", "empty"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path: Path, text: str, target: str, message: str) -> None:
    path = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(TrainingError, match=re.escape(message)):
        load_csv(path, target)


def test_csv_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="cannot read"):
        load_csv(tmp_path / "missing.csv", "y")
