"""The packager's side of real-world tables: missing values in the reference CSV,
column names as they are (all unusable ones in one error), declared bounds
instead of the reference range, class names for integer-coded classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.__main__ import package_config_from
from training.datasets import FeatureInfo, load_builtin, load_csv
from training.errors import TrainingError
from training.features import feature_spec
from training.package import (
    api_names,
    class_names,
    declared_bounds,
    missing_parity_rows,
    nullable_features,
)

NAMES = ["sepal length (cm)", "income-2023", "od280/od315_of_diluted_wines", "age"]


def test_column_names_are_kept_as_they_are() -> None:
    assert api_names(NAMES, {}) == NAMES
    renamed = api_names(NAMES, {"sepal length (cm)": "sepal_length"})
    assert renamed == ["sepal_length", *NAMES[1:]]


def test_every_unusable_name_is_listed_in_one_error() -> None:
    names = ["ok", "bad\tname", "x" * 201, "age", "fare"]
    with pytest.raises(TrainingError) as caught:
        api_names(names, {"fare": "age", "ok": " ", "nope": "n"})
    message = str(caught.value)
    assert message.startswith("unusable feature names (5): ")
    for part in (
        "--rename names 'nope', not a feature",
        "' ' (renamed from 'ok') is empty",
        "'bad\\tname' holds a control character",
        "is longer than 200 characters",
        "'age' names more than one feature",
    ):
        assert part in message
    assert "--rename" in message


def test_nullable_features_come_from_the_data_and_the_flag() -> None:
    assert nullable_features(NAMES, ["age"], ["income-2023"]) == {"age", "income-2023"}
    assert nullable_features(NAMES, ["all"], []) == set(NAMES)
    with pytest.raises(TrainingError, match=r"--nullable names unknown features \['agee'\]"):
        nullable_features(NAMES, ["agee"], [])


def test_declared_bounds_are_checked_together() -> None:
    infos = [FeatureInfo("fare", "Fare", None), FeatureInfo("port", "Port", None, "category")]
    with pytest.raises(TrainingError) as caught:
        declared_bounds(infos, {"fare": (5.0, 1.0), "port": (0.0, None), "x": (None, 1.0)})
    assert str(caught.value) == (
        "--bounds: 'x' is not a feature; 'port' is a category; 'fare': 5.0 is above 1.0"
    )
    (fare, port) = declared_bounds(infos, {"fare": (0.0, None)})
    assert fare.declared_bounds == {"minimum": 0.0}
    assert port.declared_bounds == {}


def test_the_reference_range_refuses_nothing_unless_strict() -> None:
    fares = np.array([5.0, 80.0, 300.0, np.nan])
    info = FeatureInfo("fare", "Fare", None)
    loose = feature_spec(info, fares, "declared", nullable=True)
    assert not {"minimum", "exclusive_minimum", "maximum"} & set(loose)
    assert loose["training_min"] == 5.0
    assert loose["missing_rate"] == 0.25
    assert loose["nullable"] is True
    strict = feature_spec(info, fares, "plausible", nullable=True)
    assert strict["exclusive_minimum"] == 0.0
    assert strict["maximum"] == pytest.approx(300 + 10 * 295)
    declared = FeatureInfo("fare", "Fare", None, declared_bounds={"minimum": 0.0})
    both = feature_spec(declared, fares, "plausible", nullable=True)
    assert (both["minimum"], both["bounds_declared"]) == (0.0, True)
    assert "exclusive_minimum" not in both
    assert feature_spec(declared, fares, "declared", nullable=True)["minimum"] == 0.0


def test_a_column_with_no_value_at_all_is_refused() -> None:
    with pytest.raises(TrainingError, match="feature 'age' has no value"):
        feature_spec(FeatureInfo("age", "Age", None), np.array([np.nan, np.nan]), "declared")


def test_builtin_data_sets_declare_their_physical_bounds() -> None:
    iris = load_builtin("iris")
    assert all(f.declared_bounds == {"exclusive_minimum": 0.0} for f in iris.features)
    spec = feature_spec(iris.features[0], iris.X[:, 0])
    assert (spec["exclusive_minimum"], spec["bounds_declared"]) == (0.0, True)


def test_reference_csv_keeps_what_pandas_reads_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "reference.csv"
    path.write_text(
        "age,port,n children,label\n22,S,1,0\n,C,NA,1\nNULL,,2,0\n#N/A,<NA>,3,1\n40,nan,0,0\n"
    )
    data = load_csv(path, "label", typed=True)
    assert [(f.name, f.kind) for f in data.features] == [
        ("age", "integer"),
        ("port", "category"),
        ("n children", "integer"),
    ]
    ages = np.asarray(data.X[:, 0], dtype=np.float64)
    assert np.isnan(ages).tolist() == [False, True, True, True, False]
    assert [v if isinstance(v, str) else None for v in data.X[:, 1]] == [
        "S",
        "C",
        None,
        None,
        None,
    ]
    with pytest.raises(TrainingError, match="column 'age' has a missing value on line 3"):
        load_csv(path, "label")


def test_class_names_name_integer_coded_classes() -> None:
    class Model:
        classes_ = np.array([0, 1])

    assert class_names(Model(), None, ["died", "survived"]) == ["died", "survived"]
    with pytest.raises(TrainingError, match="--class-names gives 3 names for the model's 2"):
        class_names(Model(), None, ["a", "b", "c"])


def test_the_command_line_reads_the_new_flags() -> None:
    config = package_config_from(
        [
            "model.joblib",
            "--name",
            "titanic",
            "--version",
            "1.0.0",
            "--nullable",
            "age,embarked",
            "--rename",
            "sepal length (cm)=sepal_length,income-2023=income",
            "--bounds",
            "fare=0:,age=0:120,x=:5",
            "--strict-bounds",
            "--class-names",
            "died,survived",
        ]
    )
    assert config.nullable == ["age", "embarked"]
    assert config.rename == {"sepal length (cm)": "sepal_length", "income-2023": "income"}
    assert config.bounds == {"fare": (0.0, None), "age": (0.0, 120.0), "x": (None, 5.0)}
    assert config.strict_bounds
    assert config.class_names == ["died", "survived"]


def test_the_parity_gate_gets_random_rows_with_each_nullable_feature_missing_at_random() -> None:
    specs = [
        feature_spec(
            FeatureInfo("age", "Age", None),
            np.array([1.0, 80.0, np.nan]),
            "declared",
            nullable=True,
        ),
        feature_spec(FeatureInfo("fare", "Fare", None), np.array([5.0, 300.0]), "declared"),
        feature_spec(
            FeatureInfo("port", "Port", None, "category"),
            np.array(["S", "C", np.nan], dtype=object),
            "declared",
            nullable=True,
        ),
    ]
    rows = missing_parity_rows(specs, {"age", "port"}, 400)
    assert rows.shape == (400, 3)
    missing = np.array([[v != v for v in row] for row in rows])
    assert 100 < missing[:, 0].sum() < 300
    assert 100 < missing[:, 2].sum() < 300
    assert not missing[:, 1].any()
    present_ages = rows[~missing[:, 0], 0].astype(float)
    assert present_ages.min() >= 1.0
    assert present_ages.max() <= 80.0
    assert set(rows[~missing[:, 2], 2]) == {"S", "C"}
    assert len(missing_parity_rows(specs, set(), 400)) == 0
