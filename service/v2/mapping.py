"""How a model's features and predictions map onto V2 tensors: a function of the manifest.

Numeric (number and integer) features travel as one FP32 matrix `features`
of shape [-1, n_numeric] (columns in manifest order among the numeric
features: the columnar batch V2 clients send); a model without numeric
features has no `features` input. Each category feature is a BYTES input of
its own, named after the feature (`features_category` for one called
`features` beside the numeric matrix), shape [-1] ([-1, 1] is accepted too):
one string per row, one of the feature's categories, which the metadata
lists in `properties["categories"]` (JSON: input name to allowed values). The codec
turns each string into its index in the manifest's `categories`, the column
the backends take. A classifier answers with three outputs: `predicted_class` (INT64),
`predicted_class_name` (BYTES) and `probabilities` (FP32, [-1, n_classes]) —
the fields of /predict, as tensors; a regressor with one, `prediction` (FP64,
[-1]). `InputTensor.columns` says which manifest features a tensor carries.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from service.backends.base import Outputs
from service.manifest import CategoryFeature, IntegerFeature, Manifest, NumberFeature
from service.schemas import FLOAT32_MAX
from service.v2.tensors import (
    NUMERIC_DATATYPES,
    TensorError,
    bytes_tensor_binary,
    describe,
)

FEATURES_INPUT = "features"
SMALL_TENSOR = 64
# How much of a rejected value, and how many allowed values, an error message shows.
SHOWN_VALUE_CHARS = 60
SHOWN_CATEGORIES = 10


@dataclass
class Bounds:
    """Inclusive float64 bounds per column: exclusive manifest bounds become the
    next representable double, so two comparisons check everything and NaN
    fails both."""

    lower: npt.NDArray[np.float64]
    upper: npt.NDArray[np.float64]
    lower_text: tuple[str, ...]
    upper_text: tuple[str, ...]

    @functools.cached_property
    def lower_list(self) -> list[float]:
        return [float(bound) for bound in self.lower]

    @functools.cached_property
    def upper_list(self) -> list[float]:
        return [float(bound) for bound in self.upper]

    @functools.cached_property
    def tiled_lower(self) -> npt.NDArray[np.float64]:
        return np.tile(self.lower, _block_rows(self.lower.size))

    @functools.cached_property
    def tiled_upper(self) -> npt.NDArray[np.float64]:
        return np.tile(self.upper, _block_rows(self.upper.size))


def _block_rows(columns: int) -> int:
    return max(1, 16384 // columns)


def _bounds(features: list[NumberFeature | IntegerFeature]) -> Bounds:
    lower, upper, lower_text, upper_text = [], [], [], []
    for feature in features:
        if feature.exclusive_minimum is not None:
            lower.append(np.nextafter(feature.exclusive_minimum, np.inf))
            lower_text.append(f"greater than {feature.exclusive_minimum}")
        else:
            minimum = max(feature.minimum, -FLOAT32_MAX) if feature.minimum is not None else None
            lower.append(minimum if minimum is not None else -FLOAT32_MAX)
            lower_text.append(f"at least {minimum if minimum is not None else -FLOAT32_MAX}")
        if feature.exclusive_maximum is not None:
            upper.append(np.nextafter(feature.exclusive_maximum, -np.inf))
            upper_text.append(f"less than {feature.exclusive_maximum}")
        else:
            maximum = min(feature.maximum, FLOAT32_MAX) if feature.maximum is not None else None
            upper.append(maximum if maximum is not None else FLOAT32_MAX)
            upper_text.append(f"at most {maximum if maximum is not None else FLOAT32_MAX}")
    return Bounds(
        np.asarray(lower, dtype=np.float64),
        np.asarray(upper, dtype=np.float64),
        tuple(lower_text),
        tuple(upper_text),
    )


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    # Manifest feature indices, in the tensor's column order.
    columns: tuple[int, ...]
    feature_names: tuple[str, ...]
    accepted: frozenset[str]
    bounds: Bounds
    # Positions (in this tensor) of the integer features: whole numbers only, as /predict.
    integers: tuple[int, ...] = ()
    # Positions (in this tensor) of the nullable features: NaN (JSON null) is their missing value.
    nullable: tuple[int, ...] = ()

    @property
    def shape(self) -> list[int]:
        return [-1, len(self.columns)]

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "feature_names": list(self.feature_names),
            "nullable": [i in self.nullable for i in range(len(self.columns))],
        }

    def check(self, values: npt.NDArray[Any]) -> None:
        if self.nullable and values.dtype.kind == "f":
            values = self._present(values)
        self._check_bounds(values)
        if self.integers and values.dtype.kind == "f":
            whole = values[:, list(self.integers)]
            fractional = np.argwhere(whole != np.floor(whole))
            if fractional.size:
                row, position = (int(i) for i in fractional[0])
                column = self.integers[position]
                more = len(fractional) - 1
                raise TensorError(
                    f"input '{self.name}' row {row} feature '{self.feature_names[column]}': "
                    f"{values[row, column].item()} is not an integer"
                    + (f" ({more} more invalid values)" if more else "")
                )

    def _present(self, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The values with each nullable column's NaN (a missing value) replaced by a
        value its checks accept: only what is present is checked."""
        columns = list(self.nullable)
        part = values[:, columns]
        absent = np.isnan(part)
        if not absent.any():
            return values
        lower = self.bounds.lower[columns]
        # A whole number within the bounds: integer columns accept it too.
        fill = np.clip(np.ceil(lower), lower, self.bounds.upper[columns])
        checked = values.astype(np.float64)
        checked[:, columns] = np.where(absent, fill, part)
        return checked

    def _check_bounds(self, values: npt.NDArray[Any]) -> None:
        """The manifest's bounds, float32 range, no NaN or infinity: vectorised.

        Compared flat against bounds tiled to a block of rows: broadcasting a
        row of bounds over a narrow matrix runs numpy's inner loop once per
        row, several times slower.
        """
        bounds = self.bounds
        if values.size <= SMALL_TENSOR:
            # A few rows: numpy's per-call overhead would cost more than the work.
            lower, upper = bounds.lower_list, bounds.upper_list
            if all(
                lower[column] <= value <= upper[column]
                for row in values.tolist()
                for column, value in enumerate(row)
            ):
                return
        else:
            flat = values.astype(np.float64, copy=False).reshape(-1)
            block = bounds.tiled_lower.size
            for start in range(0, flat.size, block):
                chunk = flat[start : start + block]
                size = chunk.size
                if not (
                    (chunk >= bounds.tiled_lower[:size]) & (chunk <= bounds.tiled_upper[:size])
                ).all():
                    break
            else:
                return
        valid = (values >= bounds.lower) & (values <= bounds.upper)
        invalid = np.argwhere(~valid)
        row, column = (int(i) for i in invalid[0])
        value = values[row, column].item()
        if isinstance(value, float) and np.isnan(value):
            reason = "NaN is not a number"
        elif isinstance(value, float) and np.isinf(value):
            reason = f"{value} is not finite"
        elif value < bounds.lower[column]:
            reason = f"{value} is out of bounds: must be {bounds.lower_text[column]}"
        else:
            reason = f"{value} is out of bounds: must be {bounds.upper_text[column]}"
        more = len(invalid) - 1
        raise TensorError(
            f"input '{self.name}' row {row} feature '{self.feature_names[column]}': {reason}"
            + (f" ({more} more invalid values)" if more else "")
        )


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    # None: one element per row (shape [-1]); else [-1, width].
    width: int | None
    values: Callable[[Outputs], npt.NDArray[Any]]
    # Little-endian bytes of the values, as the binary extension sends them.
    binary: Callable[[npt.NDArray[Any]], bytes]
    # The values as JSON-serialisable data (orjson serialises numpy arrays).
    json: Callable[[npt.NDArray[Any]], Any]
    # json(values(inference)) for a one-row class answer whose probabilities
    # (`row`, as Python floats) are all within [0, 1], from those floats and
    # their winning class alone; None for a regressor's outputs.
    one_row_json: Callable[[Sequence[float], int], Any] | None = None

    @property
    def shape(self) -> list[int]:
        return [-1] if self.width is None else [-1, self.width]


@dataclass(frozen=True)
class CategoryTensor:
    """One category feature as a BYTES tensor: a string per row, sent as its index."""

    name: str
    feature: str
    column: int
    categories: tuple[str, ...]
    # A JSON null is the missing value (the empty string only if it is a category).
    nullable: bool = False
    datatype: ClassVar[str] = "BYTES"
    accepted: ClassVar[frozenset[str]] = frozenset({"BYTES"})

    @property
    def shape(self) -> list[int]:
        return [-1]

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "feature_names": [self.feature],
            "nullable": [self.nullable],
            "categories": list(self.categories),
        }

    @property
    def columns(self) -> tuple[int, ...]:
        return (self.column,)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (self.feature,)

    @functools.cached_property
    def _index(self) -> dict[Any, int]:
        # Strings from JSON, bytes from the binary extension: no decoding step.
        index: dict[Any, int] = {value: i for i, value in enumerate(self.categories)}
        index.update((value.encode(), i) for i, value in enumerate(self.categories))
        return index

    def indices(self, values: list[Any], where: str) -> npt.NDArray[np.float64]:
        """Each value's index in the feature's categories; a 400 naming the first stranger."""
        get = self._index.get
        found: list[float | int | None] = [
            get(value) if type(value) in (str, bytes) else None for value in values
        ]
        if self.nullable and None in values:
            found = [
                math.nan if value is None else code
                for value, code in zip(values, found, strict=True)
            ]
        if None not in found:
            return np.asarray(found, dtype=np.float64)
        row = found.index(None)
        more = found.count(None) - 1
        raise TensorError(
            f"{where} row {row} feature '{self.feature}': {self._shown(values[row])} "
            f"{self._allowed()}" + (f" ({more} more invalid values)" if more else "")
        )

    @staticmethod
    def _shown(value: Any) -> str:
        if type(value) is bytes:
            value = value.decode("utf-8", errors="replace")
        if type(value) is not str:
            return f"is {describe(value)}, not a string"
        shown = json.dumps(value[:SHOWN_VALUE_CHARS], ensure_ascii=False)
        return shown + ("..." if len(value) > SHOWN_VALUE_CHARS else "")

    def _allowed(self) -> str:
        shown = ", ".join(
            json.dumps(value[:SHOWN_VALUE_CHARS], ensure_ascii=False)
            + ("..." if len(value) > SHOWN_VALUE_CHARS else "")
            for value in self.categories[:SHOWN_CATEGORIES]
        )
        rest = len(self.categories) - SHOWN_CATEGORIES
        tail = f" and {rest} more (see the model metadata's properties)" if rest > 0 else ""
        return f"is not one of the allowed values: {shown}{tail}"


ModelInput = InputTensor | CategoryTensor


@dataclass(frozen=True)
class TensorMap:
    inputs: tuple[ModelInput, ...]
    outputs: tuple[OutputTensor, ...]
    properties: dict[str, Any]

    @functools.cached_property
    def outputs_by_name(self) -> dict[str, OutputTensor]:
        return {output.name: output for output in self.outputs}

    @functools.cached_property
    def inputs_by_name(self) -> dict[str, ModelInput]:
        return {tensor.name: tensor for tensor in self.inputs}


def _unique(name: str, taken: set[str]) -> str:
    """The feature's name as its input's, suffixed if the numeric matrix took it."""
    unique = name
    while unique in taken:
        unique += "_category"
    taken.add(unique)
    return unique


def _inputs(manifest: Manifest) -> tuple[ModelInput, ...]:
    numeric = [
        (column, feature)
        for column, feature in enumerate(manifest.features)
        if isinstance(feature, NumberFeature | IntegerFeature)
    ]
    taken = {FEATURES_INPUT} if numeric else set()
    categories = []
    for column, feature in enumerate(manifest.features):
        if isinstance(feature, CategoryFeature):
            name = _unique(feature.field_name, taken)
            categories.append(
                CategoryTensor(
                    name,
                    feature.field_name,
                    column,
                    tuple(feature.categories),
                    feature.nullable,
                )
            )
    if not numeric:
        return tuple(categories)
    return (
        InputTensor(
            FEATURES_INPUT,
            "FP32",
            tuple(column for column, _ in numeric),
            tuple(feature.field_name for _, feature in numeric),
            frozenset(NUMERIC_DATATYPES),
            _bounds([feature for _, feature in numeric]),
            tuple(i for i, (_, f) in enumerate(numeric) if isinstance(f, IntegerFeature)),
            tuple(i for i, (_, f) in enumerate(numeric) if f.nullable),
        ),
        *categories,
    )


def _little_endian(values: npt.NDArray[Any]) -> bytes:
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def within_unit(values: Sequence[float]) -> bool:
    """Every value in [0, 1]; NaN is not (both comparisons are false for it)."""
    return all(map(_ZERO.__le__, values)) and all(map(_ONE.__ge__, values))


_ZERO, _ONE = 0.0, 1.0


def _classification_outputs(classes: list[str]) -> tuple[OutputTensor, ...]:
    names = np.asarray(classes, dtype=object)
    encoded = [name.encode() for name in classes]
    framed = [bytes_tensor_binary([name]) for name in encoded]

    def class_index(inference: Outputs) -> npt.NDArray[Any]:
        winners: npt.NDArray[Any] = inference.argmax(axis=1).astype(np.int64, copy=False)
        return winners

    def probabilities(inference: Outputs) -> npt.NDArray[Any]:
        # A few rows already within [0, 1] (no NaN) are what the clip would
        # return: checked in Python, cheaper than np.clip's dispatch.
        if inference.size > SMALL_TENSOR or not within_unit(inference.ravel().tolist()):
            inference = np.clip(inference, 0.0, 1.0)
        return np.ascontiguousarray(inference, dtype=np.float32)

    return (
        OutputTensor(
            "predicted_class",
            "INT64",
            None,
            class_index,
            _little_endian,
            lambda values: values,
            lambda _, winner: [winner],
        ),
        OutputTensor(
            "predicted_class_name",
            "BYTES",
            None,
            class_index,
            lambda values: b"".join(map(framed.__getitem__, values.tolist())),
            lambda values: (
                [classes[i] for i in values.tolist()]
                if values.size <= SMALL_TENSOR
                else names[values].tolist()
            ),
            lambda _, winner: [classes[winner]],
        ),
        OutputTensor(
            "probabilities",
            "FP32",
            len(classes),
            probabilities,
            _little_endian,
            lambda values: values.ravel(),
            # Within [0, 1], probabilities() does not clip; the cast to float32
            # is the one it makes (exact when the backend answered float32).
            lambda row, _: np.array(row, dtype=np.float32),
        ),
    )


def _regression_outputs() -> tuple[OutputTensor, ...]:
    def prediction(inference: Outputs) -> npt.NDArray[Any]:
        return np.ascontiguousarray(inference.reshape(-1), dtype=np.float64)

    return (OutputTensor("prediction", "FP64", None, prediction, _little_endian, lambda v: v),)


def tensor_map(manifest: Manifest) -> TensorMap:
    # Not tensors, but what a client needs to build and read them.
    properties: dict[str, Any] = {"task": manifest.task, "feature_names": manifest.field_names}
    if manifest.classes is None:
        outputs = _regression_outputs()
    else:
        outputs = _classification_outputs(manifest.classes)
        properties["classes"] = list(manifest.classes)
    inputs = _inputs(manifest)
    categories = {t.name: list(t.categories) for t in inputs if isinstance(t, CategoryTensor)}
    if categories:
        properties["categories"] = categories
    return TensorMap(inputs=inputs, outputs=outputs, properties=properties)


def check_datatype(tensor: ModelInput, datatype: str) -> None:
    if datatype not in tensor.accepted:
        raise TensorError(
            f"input '{tensor.name}': datatype {datatype!r} is not accepted; use one of "
            + ", ".join(sorted(tensor.accepted))
        )
