"""Open Inference Protocol tensors: datatypes, and tensor data to and from numpy.

Vectorised throughout: JSON data becomes a numpy array through the C `array`
module (which also rejects strings, nulls and nested garbage), binary data
through np.frombuffer; nothing loops over elements in Python.
"""

from __future__ import annotations

import array
import itertools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.errors import ClientError

_LENGTH = struct.Struct("<I")


class TensorError(ClientError):
    """A request tensor that is malformed or does not fit the model (400)."""


@dataclass(frozen=True)
class Datatype:
    name: str
    # Little-endian numpy dtype of the binary representation.
    dtype: np.dtype[Any]
    # `array` typecode that parses (and range-checks) JSON elements.
    typecode: str
    integer: bool


def _numeric(name: str, dtype: str, typecode: str) -> Datatype:
    return Datatype(name, np.dtype(dtype), typecode, integer=typecode not in "fd")


# The datatypes a numeric feature tensor may arrive in. JSON floats are parsed
# as doubles whatever the declared width: range and bounds are checked before
# the cast to the model's float32.
NUMERIC_DATATYPES = {
    datatype.name: datatype
    for datatype in (
        _numeric("FP32", "<f4", "d"),
        _numeric("FP64", "<f8", "d"),
        _numeric("INT8", "<i1", "b"),
        _numeric("INT16", "<i2", "h"),
        _numeric("INT32", "<i4", "i"),
        _numeric("INT64", "<i8", "q"),
        _numeric("UINT8", "<u1", "B"),
        _numeric("UINT16", "<u2", "H"),
        _numeric("UINT32", "<u4", "I"),
        _numeric("UINT64", "<u8", "Q"),
    )
}
ALL_DATATYPES = frozenset(
    {*NUMERIC_DATATYPES, "BOOL", "FP16", "BF16", "BYTES"}
)  # as the specification lists them


def describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def _first_wrong_element(elements: Sequence[Any], datatype: Datatype) -> tuple[int, str] | None:
    """Where the fast conversion failed, and why: only run on the error path."""
    for index, value in enumerate(elements):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return index, f"is {describe(value)}, not a number"
        if datatype.integer and not isinstance(value, int):
            return index, f"is {value!r}, not an integer as {datatype.name} requires"
        if datatype.integer:
            try:
                array.array(datatype.typecode, [value])
            except OverflowError:
                return index, f"{value} is out of range for {datatype.name}"
    return None


def json_tensor(
    data: Any,
    datatype: Datatype,
    shape: tuple[int, int],
    where: str,
    column_names: Sequence[str],
    bools_possible: bool,
    nullable: Sequence[int] = (),
) -> npt.NDArray[Any]:
    """`data` (flat, or nested as the shape) as an array of that shape.

    `bools_possible` is False when the body holds no `true`/`false` token at
    all: JSON booleans would pass the array module as 1 and 0, and only then
    is each element's type looked at.
    """
    rows, columns = shape
    if type(data) is not list:
        raise TensorError(f"{where}: data must be an array")
    if data and type(data[0]) is list:
        if len(data) != rows or set(map(type, data)) != {list} or set(map(len, data)) != {columns}:
            raise TensorError(
                f"{where}: nested data must be {rows} arrays of {columns} elements (shape "
                f"[{rows}, {columns}])"
            )
        elements: Sequence[Any] = list(itertools.chain.from_iterable(data))
    else:
        elements = data
        if len(elements) != rows * columns:
            raise TensorError(
                f"{where}: shape [{rows}, {columns}] needs {rows * columns} elements, "
                f"data has {len(elements)}"
            )
    if nullable and not datatype.integer and None in elements:
        missing = frozenset(nullable)
        elements = [
            math.nan if value is None and index % columns in missing else value
            for index, value in enumerate(elements)
        ]
    try:
        parsed = array.array(datatype.typecode, elements)
    except (TypeError, OverflowError):
        parsed = None
    wrong = (
        _first_wrong_element(elements, datatype)
        if parsed is None or (bools_possible and any(type(e) is bool for e in elements))
        else None
    )
    if parsed is None or wrong is not None:
        index, reason = wrong or (0, "is not a number")
        row, column = divmod(index, columns)
        raise TensorError(f"{where} row {row} feature '{column_names[column]}': {reason}")
    return np.frombuffer(parsed, dtype=parsed.typecode).reshape(shape)


def binary_tensor(
    buffer: bytes, offset: int, size: int, datatype: Datatype, shape: tuple[int, int], where: str
) -> npt.NDArray[Any]:
    count = shape[0] * shape[1]
    expected = count * datatype.dtype.itemsize
    if size != expected:
        raise TensorError(
            f"{where}: binary_data_size is {size} bytes, shape {list(shape)} of "
            f"{datatype.name} needs {expected}"
        )
    return np.frombuffer(buffer, dtype=datatype.dtype, count=count, offset=offset).reshape(shape)


def bytes_tensor_binary(values: Sequence[bytes]) -> bytes:
    """BYTES elements as the binary extension frames them: 4-byte little-endian length, bytes."""
    return b"".join(struct.pack("<I", len(value)) + value for value in values)


def binary_bytes_tensor(
    buffer: bytes, offset: int, size: int, count: int, where: str
) -> list[bytes]:
    """`count` BYTES elements framed as bytes_tensor_binary frames them, filling `size` bytes."""
    elements: list[bytes] = []
    append, unpack = elements.append, _LENGTH.unpack_from
    position, end = offset, offset + size
    # A Python loop, but over an element per row: a few hundred ns each.
    while position < end and len(elements) < count:
        if position + 4 > end:
            raise TensorError(f"{where}: element {len(elements)} has a truncated length prefix")
        (length,) = unpack(buffer, position)
        position += 4
        if position + length > end:
            raise TensorError(
                f"{where}: element {len(elements)} says {length} bytes, "
                f"{end - position} are left in its binary_data_size"
            )
        append(buffer[position : position + length])
        position += length
    if len(elements) != count or position != end:
        raise TensorError(
            f"{where}: binary_data_size {size} must hold exactly {count} elements (each a "
            f"4-byte little-endian length and the bytes); "
            + (
                f"it holds {len(elements)}"
                if len(elements) != count
                else f"{end - position} bytes are left over"
            )
        )
    return elements
