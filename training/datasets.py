"""Load a labelled table into plain arrays plus the names the API will expose."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from training.errors import TrainingError

BUILTIN_DATASETS = ("iris", "wine", "breast_cancer")
# sklearn only says "target"; a descriptive name reads better in /model-info.
_BUILTIN_TARGETS = {"iris": "species", "wine": "cultivar", "breast_cancer": "diagnosis"}

FEATURE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MODEL_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_UNIT_RE = re.compile(r"^(?P<label>.*?)\s*\((?P<unit>[^()]*)\)\s*$")
# Spellings of "no value" seen in exported spreadsheets; all are missing, not text.
_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})


@dataclass(frozen=True)
class FeatureInfo:
    name: str
    description: str
    unit: str | None


@dataclass(frozen=True)
class Dataset:
    X: NDArray[np.float64]
    y: NDArray[np.int64]  # class indices 0..k-1, positions in class_names
    class_names: list[str]
    features: list[FeatureInfo]
    source: str  # "sklearn:iris" or "csv:<file name>"
    target: str


def feature_info(raw: str) -> FeatureInfo:
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
    if not FEATURE_NAME_RE.match(name):
        raise TrainingError(
            f"column {raw!r} cannot be made into a feature name matching "
            f"{FEATURE_NAME_RE.pattern} (got {name!r}); rename the column"
        )
    description = text[:1].upper() + text[1:] if text else name
    return FeatureInfo(name=name, description=description, unit=unit)


def feature_infos(raw_names: Sequence[str]) -> list[FeatureInfo]:
    infos = [feature_info(raw) for raw in raw_names]
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
    }
    if dataset not in loaders:
        raise TrainingError(f"unknown dataset {dataset!r}; choose one of {BUILTIN_DATASETS}")
    bunch = loaders[dataset]()
    return Dataset(
        X=np.asarray(bunch.data, dtype=np.float64),
        y=np.asarray(bunch.target, dtype=np.int64),
        class_names=[str(c) for c in bunch.target_names],
        features=feature_infos([str(f) for f in bunch.feature_names]),
        source=f"sklearn:{dataset}",
        target=_BUILTIN_TARGETS[dataset],
    )


def _parse_number(text: str, column: str, line: int) -> float:
    value = text.strip()
    if value.lower() in _MISSING:
        raise TrainingError(f"column {column!r} has a missing value on line {line}")
    try:
        number = float(value)
    except ValueError:
        raise TrainingError(f"column {column!r} is not numeric: {value!r} on line {line}") from None
    if not math.isfinite(number):
        raise TrainingError(f"column {column!r} has a non-finite value {value!r} on line {line}")
    return number


def load_csv(path: Path, target: str) -> Dataset:
    """Read a CSV with a header row: every column but `target` is a numeric feature."""
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
    _, header = numbered[0]
    header = [h.strip() for h in header]
    data = numbered[1:]
    if len(set(header)) != len(header):
        duplicates = sorted({h for h in header if header.count(h) > 1})
        raise TrainingError(f"{path}: duplicate column names {duplicates}")
    if target not in header:
        raise TrainingError(f"target column {target!r} is not in the header of {path}: {header}")
    if len(header) < 2:
        raise TrainingError(f"{path} has no feature columns besides the target {target!r}")
    if not data:
        raise TrainingError(f"{path} has a header but no data rows")

    target_index = header.index(target)
    feature_columns = [i for i in range(len(header)) if i != target_index]
    infos = feature_infos([header[i] for i in feature_columns])

    x = np.empty((len(data), len(feature_columns)), dtype=np.float64)
    labels: list[str] = []
    for r, (line, row) in enumerate(data):
        if len(row) != len(header):
            raise TrainingError(
                f"{path} line {line} has {len(row)} fields, the header has {len(header)}"
            )
        for c, i in enumerate(feature_columns):
            x[r, c] = _parse_number(row[i], header[i], line)
        label = row[target_index].strip()
        if label.lower() in _MISSING:
            raise TrainingError(f"target column {target!r} has a missing value on line {line}")
        labels.append(label)

    class_names = sorted(set(labels))
    if len(class_names) < 2:
        raise TrainingError(
            f"target column {target!r} has only one class ({class_names[0]!r}); "
            "a classifier needs at least 2"
        )
    index = {name: i for i, name in enumerate(class_names)}
    return Dataset(
        X=x,
        y=np.array([index[label] for label in labels], dtype=np.int64),
        class_names=class_names,
        features=infos,
        source=f"csv:{path.name}",
        target=target,
    )
