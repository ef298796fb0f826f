"""Load a table into plain arrays plus the names and kinds the API will expose."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.manifest import FeatureKind, Task
from training.errors import TrainingError

BUILTIN_DATASETS = ("iris", "wine", "breast_cancer", "diabetes")
BUILTIN_TASKS: dict[str, Task] = {
    "iris": "classification",
    "wine": "classification",
    "breast_cancer": "classification",
    "diabetes": "regression",
}
# sklearn only says "target"; a descriptive name reads better in /model-info.
_BUILTIN_TARGETS = {
    "iris": "species",
    "wine": "cultivar",
    "breast_cancer": "diagnosis",
    "diabetes": "progression",
}

# Every physical quantity in the built-in data sets is a positive measurement
# (a length, a concentration, a count of something present), except these,
# which reach zero: declared, so the bundles refuse what cannot be measured.
_BUILTIN_ZERO_ALLOWED = frozenset(
    {
        "mean concavity",
        "mean concave points",
        "concavity error",
        "concave points error",
        "worst concavity",
        "worst concave points",
    }
)

_UNIT_RE = re.compile(r"^(?P<label>.*?)\s*\((?P<unit>[^()]*)\)\s*$")
_INTEGER_RE = re.compile(r"^[+-]?[0-9]+$")
# Fitting derives API names from headers; they stay plain identifiers.
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
_IDENTIFIER_RE = re.compile(IDENTIFIER_PATTERN, re.ASCII)
# Spellings of "no value" seen in exported spreadsheets, and every string
# pandas.read_csv reads as NA by default: all are missing, not text.
_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "<na>", "-nan", "#na", "#n/a"})
_PANDAS_MISSING = frozenset({"#N/A N/A", "-1.#IND", "-1.#QNAN", "1.#IND", "1.#QNAN"})


def is_missing(text: str) -> bool:
    """A CSV field pandas (or a spreadsheet export) means as no value."""
    value = text.strip()
    return value.lower() in _MISSING or value in _PANDAS_MISSING


@dataclass(frozen=True)
class FeatureInfo:
    name: str
    description: str
    unit: str | None
    kind: FeatureKind = "number"
    # Bounds the data set declares (manifest keys minimum, exclusive_minimum, maximum).
    declared_bounds: dict[str, float] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Dataset:
    """Features as columns of one 2-D array: float64 when every feature is numeric,
    object (floats and strings) when a category is among them."""

    X: NDArray[Any]
    # Classification: class indices 0..k-1 (positions in class_names).
    # Regression: the target values. None: no target column.
    y: NDArray[Any] | None
    task: Task | None
    class_names: list[str] | None
    features: list[FeatureInfo]
    source: str  # "sklearn:iris" or "csv:<file name>"
    target: str | None
    # Raw target labels as read (packaging maps encoded classes with them).
    target_labels: list[str] | None = field(default=None, compare=False)


def feature_info(raw: str, kind: FeatureKind = "number") -> FeatureInfo:
    """Turn a column header such as "sepal length (cm)" into an API field name and unit."""
    text = raw.strip()
    match = _UNIT_RE.match(text)
    unit: str | None = None
    label = text
    if match and match.group("label") and match.group("unit").strip():
        label = match.group("label")
        unit = match.group("unit").strip()
    name = re.sub(r"[^A-Za-z0-9_]+", "_", label)
    name = re.sub(r"_+", "_", name).strip("_")
    if name[:1].isdigit():
        # Field names become Python identifiers in the generated API schema.
        name = "f_" + name
    if not _IDENTIFIER_RE.match(name):
        raise TrainingError(
            f"column {raw!r} cannot be made into a feature name matching "
            f"{IDENTIFIER_PATTERN} (got {name!r}); rename the column"
        )
    description = text[:1].upper() + text[1:] if text else name
    return FeatureInfo(name=name, description=description, unit=unit, kind=kind)


def feature_infos(
    raw_names: Sequence[str], kinds: Sequence[FeatureKind] | None = None
) -> list[FeatureInfo]:
    kinds = kinds or ["number"] * len(raw_names)
    infos = [feature_info(raw, kind) for raw, kind in zip(raw_names, kinds, strict=True)]
    seen: dict[str, str] = {}
    for raw, info in zip(raw_names, infos, strict=True):
        if info.name in seen:
            raise TrainingError(
                f"columns {seen[info.name]!r} and {raw!r} both become feature name "
                f"{info.name!r}; rename one of them"
            )
        seen[info.name] = raw
    return infos


def model_name_from(text: str) -> str:
    """Derive a default bundle name (a URL segment and metric label) from a file stem."""
    name = re.sub(r"[^a-z0-9_-]+", "_", text.lower())
    name = re.sub(r"_+", "_", name).strip("_-")
    if not name[:1].isalpha():
        name = ("model_" + name).rstrip("_")
    return name[:64]


def load_builtin(dataset: str) -> Dataset:
    # Imported here so `--help` and argument errors stay instant.
    from sklearn import datasets as skd

    loaders: dict[str, Callable[..., Any]] = {
        "iris": skd.load_iris,
        "wine": skd.load_wine,
        "breast_cancer": skd.load_breast_cancer,
        # Shipped inside scikit-learn: nothing is downloaded.
        "diabetes": lambda: skd.load_diabetes(scaled=False),
    }
    if dataset not in loaders:
        raise TrainingError(f"unknown dataset {dataset!r}; choose one of {BUILTIN_DATASETS}")
    bunch = loaders[dataset]()
    task = BUILTIN_TASKS[dataset]
    classification = task == "classification"
    raw_names = [str(f) for f in bunch.feature_names]
    infos = [
        replace(
            info,
            declared_bounds={
                "minimum" if raw in _BUILTIN_ZERO_ALLOWED else "exclusive_minimum": 0.0
            },
        )
        for raw, info in zip(raw_names, feature_infos(raw_names), strict=True)
    ]
    return Dataset(
        X=np.asarray(bunch.data, dtype=np.float64),
        y=np.asarray(bunch.target, dtype=np.int64 if classification else np.float64),
        task=task,
        class_names=[str(c) for c in bunch.target_names] if classification else None,
        features=infos,
        source=f"sklearn:{dataset}",
        target=_BUILTIN_TARGETS[dataset],
    )


def _parse_number(text: str, column: str, line: int) -> float:
    value = text.strip()
    if is_missing(value):
        raise TrainingError(f"column {column!r} has a missing value on line {line}")
    try:
        number = float(value)
    except ValueError:
        raise TrainingError(f"column {column!r} is not numeric: {value!r} on line {line}") from None
    if not math.isfinite(number):
        raise TrainingError(f"column {column!r} has a non-finite value {value!r} on line {line}")
    return number


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@dataclass(frozen=True)
class _Table:
    header: list[str]
    lines: list[int]
    rows: list[list[str]]

    def column(self, index: int) -> list[str]:
        return [row[index].strip() for row in self.rows]


def _read_table(path: Path) -> _Table:
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TrainingError(f"{path} is not a readable UTF-8 CSV file: {exc}") from None
    # Blank lines (often a trailing newline pair) carry no data.
    numbered = [(i, row) for i, row in enumerate(rows, start=1) if any(c.strip() for c in row)]
    if not numbered:
        raise TrainingError(f"{path} is empty; a header row is required")
    header = [h.strip() for h in numbered[0][1]]
    if len(set(header)) != len(header):
        duplicates = sorted({h for h in header if header.count(h) > 1})
        raise TrainingError(f"{path}: duplicate column names {duplicates}")
    data = numbered[1:]
    for line, row in data:
        if len(row) != len(header):
            raise TrainingError(
                f"{path} line {line} has {len(row)} fields, the header has {len(header)}"
            )
    return _Table(header, [line for line, _ in data], [row for _, row in data])


def _target(table: _Table, path: Path, target: str, task: Task) -> tuple[NDArray[Any], list[str]]:
    index = table.header.index(target)
    labels: list[str] = []
    for line, value in zip(table.lines, table.column(index), strict=True):
        if is_missing(value):
            raise TrainingError(f"target column {target!r} has a missing value on line {line}")
        labels.append(value)
    if task == "regression":
        values = [
            _parse_number(v, target, line) for v, line in zip(labels, table.lines, strict=True)
        ]
        return np.asarray(values, dtype=np.float64), labels
    return np.asarray(labels, dtype=object), labels


def _feature_column(
    table: _Table, index: int, typed: bool, categorical: Collection[str]
) -> tuple[FeatureKind, NDArray[Any]]:
    """What every value of the column allows: a category when no value is a number
    (or the model is known to take the column as text), else a number, or with
    `typed` an integer when every value is a whole number. A column mixing
    numbers and text is a typo more often than a category: an error.

    Typed (reference data), a missing value is NaN, as pandas reads it; a
    column with no value at all says nothing about its feature: an error.
    Untyped (fitting data), a missing value is an error."""
    name = table.header[index]
    values = table.column(index)
    rows = list(zip(table.lines, values, strict=True))
    present = [(line, v) for line, v in rows if not is_missing(v)]
    if not typed and len(present) < len(rows):
        line = next(line for line, v in rows if is_missing(v))
        raise TrainingError(f"column {name!r} has a missing value on line {line}")
    if not present:
        raise TrainingError(f"column {name!r} has no value on any line")
    numeric = [_is_number(v) for _, v in present]
    if name in categorical or not any(numeric):
        return "category", np.asarray(
            [np.nan if is_missing(v) else v for v in values], dtype=object
        )
    parsed = {line: _parse_number(v, name, line) for line, v in present}
    kind: FeatureKind = (
        "integer" if typed and all(_INTEGER_RE.match(v) for _, v in present) else "number"
    )
    return kind, np.asarray([parsed.get(line, np.nan) for line, _ in rows], dtype=np.float64)


def load_csv(
    path: Path,
    target: str | None,
    task: Task = "classification",
    *,
    typed: bool = False,
    categorical: Collection[str] = (),
) -> Dataset:
    """Read a CSV with a header row: every column but `target` is a feature.

    Untyped (fitting): every feature must be numeric. Typed (reference data
    for packaging): whole-number columns are integers and columns with any
    non-numeric value are categories.
    """
    table = _read_table(path)
    header = table.header
    if target is not None and target not in header:
        raise TrainingError(f"target column {target!r} is not in the header of {path}: {header}")
    if target is not None and len(header) < 2:
        raise TrainingError(f"{path} has no feature columns besides the target {target!r}")
    if not table.rows:
        raise TrainingError(f"{path} has a header but no data rows")

    feature_columns = [i for i, h in enumerate(header) if h != target]
    kinds: list[FeatureKind] = []
    columns: list[NDArray[Any]] = []
    for i in feature_columns:
        kind, column = _feature_column(table, i, typed, categorical)
        kinds.append(kind)
        columns.append(column)
    raw_names = [header[i] for i in feature_columns]
    # Packaging keeps a column's name as the model knows it; fitting derives one.
    infos = (
        [FeatureInfo(raw, raw, None, kind) for raw, kind in zip(raw_names, kinds, strict=True)]
        if typed
        else feature_infos(raw_names, kinds)
    )
    dtype = object if "category" in kinds else np.float64
    x = np.empty((len(table.rows), len(columns)), dtype=dtype)
    for j, column in enumerate(columns):
        x[:, j] = column

    y: NDArray[Any] | None = None
    labels: list[str] | None = None
    class_names: list[str] | None = None
    if target is not None:
        y, labels = _target(table, path, target, task)
        if task == "classification":
            class_names = sorted(set(labels))
            if len(class_names) < 2 and not typed:
                raise TrainingError(
                    f"target column {target!r} has only one class ({class_names[0]!r}); "
                    "a classifier needs at least 2"
                )
            index = {name: i for i, name in enumerate(class_names)}
            y = np.array([index[label] for label in labels], dtype=np.int64)
    return Dataset(
        X=x,
        y=y,
        task=task if target is not None else None,
        class_names=class_names,
        features=infos,
        source=f"csv:{path.name}",
        target=target,
        target_labels=labels,
    )
