"""V2 inference: request (JSON, or JSON header + binary tensors) → feature rows → response.

The binary tensor data extension: `Inference-Header-Content-Length` says how
many leading bytes of the body are the JSON header; the rest is the inputs'
raw little-endian data, in input order, each `parameters.binary_data_size`
bytes long. Outputs go back the same way when the request asks for it
(`parameters.binary_data_output`, or per output `parameters.binary_data`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from operator import le
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from service.backends.base import FloatMatrix, Outputs, winning_class
from service.v2.mapping import (
    SMALL_TENSOR,
    CategoryTensor,
    InputTensor,
    OutputTensor,
    TensorMap,
    check_datatype,
    within_unit,
)
from service.v2.tensors import (
    ALL_DATATYPES,
    NUMERIC_DATATYPES,
    Datatype,
    TensorError,
    binary_bytes_tensor,
    binary_tensor,
    json_tensor,
)

if TYPE_CHECKING:
    from service.pipeline import RowOutputs

HEADER_LENGTH = b"inference-header-content-length"
OCTET_STREAM = b"application/octet-stream"
# The model's one numeric matrix goes to the backend as the FP32 tensor it is.
MATRIX_DTYPE = np.float32


class ParsedRequest:
    """A decoded request: its id, its feature rows and the outputs it asks for.
    The usual request, one row of JSON numbers, is kept as Python floats
    (`one_row`, already rounded to float32) and made a matrix only if asked."""

    __slots__ = ("_rows", "id", "one_row", "outputs")

    def __init__(
        self,
        request_id: str | None,
        outputs: Sequence[tuple[OutputTensor, bool]],
        rows: FloatMatrix | None = None,
        one_row: list[float] | None = None,
    ) -> None:
        self.id = request_id
        self.outputs = outputs
        self._rows = rows
        self.one_row = one_row

    @property
    def rows(self) -> FloatMatrix:
        if self._rows is None:
            self._rows = np.array((self.one_row,), dtype=MATRIX_DTYPE)
        return self._rows

    @property
    def n_rows(self) -> int:
        return 1 if self._rows is None else self._rows.shape[0]


def _object(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise TensorError(f"{where} must be an object")
    return value


def _parameters(container: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = container.get("parameters")
    return {} if parameters is None else _object(parameters, f"{where} parameters")


def _flag(parameters: dict[str, Any], name: str, where: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if type(value) is not bool:
        raise TensorError(f"{where} parameter {name} must be true or false")
    return value


def _split(body: bytes, header_length: bytes | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    # More digits than the body's own length has is too long, and int() of a
    # few thousand digits raises (CPython's int digit limit).
    if (
        not header_length.isdigit()
        or len(header_length) > len(str(len(body)))
        or int(header_length) > len(body)
    ):
        shown = header_length[:24].decode("latin-1") + ("..." if len(header_length) > 24 else "")
        raise TensorError(
            f"Inference-Header-Content-Length {shown!r} is not a "
            f"length within the {len(body)}-byte body"
        )
    length = int(header_length)
    return body[:length], body[length:]


def _shape(tensor: InputTensor, value: Any, max_rows: int) -> tuple[int, int]:
    if type(value) is not list or len(value) != 2:
        rows = columns = None
    else:
        rows, columns = value
    if type(rows) is not int or type(columns) is not int or rows < 0 or columns < 0:
        raise TensorError(
            f"input '{tensor.name}': shape must be [rows, {len(tensor.columns)}], "
            f"got {orjson.dumps(value).decode()}"
        )
    if columns != len(tensor.columns):
        raise TensorError(
            f"input '{tensor.name}': shape {value} has {columns} columns, the model takes "
            f"{len(tensor.columns)} ({', '.join(tensor.feature_names)})"
        )
    if not 1 <= rows <= max_rows:
        raise TensorError(f"input '{tensor.name}': shape {value} must have 1 to {max_rows} rows")
    return rows, columns


def _category_shape(tensor: CategoryTensor, value: Any, max_rows: int) -> int:
    """Rows of a [rows] or [rows, 1] shape."""
    dims = value if type(value) is list and len(value) in (1, 2) else None
    if dims is None or any(type(d) is not int or d < 0 for d in dims) or dims[1:] not in ([], [1]):
        raise TensorError(
            f"input '{tensor.name}': shape must be [rows] or [rows, 1], "
            f"got {orjson.dumps(value).decode()}"
        )
    rows: int = dims[0]
    if not 1 <= rows <= max_rows:
        raise TensorError(f"input '{tensor.name}': shape {value} must have 1 to {max_rows} rows")
    return rows


def _category_datatype(tensor: CategoryTensor, name: Any) -> None:
    if type(name) is not str or name not in ALL_DATATYPES:
        raise TensorError(f"input '{tensor.name}': unknown datatype {name!r}")
    check_datatype(tensor, name)


def _json_strings(tensor: CategoryTensor, data: Any, rows: int) -> list[Any]:
    where = f"input '{tensor.name}'"
    if type(data) is not list:
        raise TensorError(f"{where}: data must be an array")
    elements: list[Any] = data
    if elements and type(elements[0]) is list:
        # Nested as the shape [rows, 1].
        if len(elements) != rows or any(type(row) is not list or len(row) != 1 for row in elements):
            raise TensorError(f"{where}: nested data must be {rows} arrays of 1 element")
        elements = [row[0] for row in elements]
    if len(elements) != rows:
        raise TensorError(f"{where}: shape has {rows} rows, data has {len(elements)} elements")
    return elements


def _category_input(
    tensor: CategoryTensor,
    entry: dict[str, Any],
    binary: bytes,
    offset: int,
    size: Any,
    max_rows: int,
) -> npt.NDArray[np.float64]:
    """The column of category indices a BYTES input carries, from JSON or binary data."""
    where = f"input '{tensor.name}'"
    _category_datatype(tensor, entry.get("datatype"))
    rows = _category_shape(tensor, entry.get("shape"), max_rows)
    if size is not None:
        _check_binary_size(where, entry, binary, offset, size)
        values: list[Any] = binary_bytes_tensor(binary, offset, size, rows, where)
    elif "data" in entry:
        values = _json_strings(tensor, entry["data"], rows)
    else:
        raise TensorError(f"{where}: no data and no binary_data_size")
    return tensor.indices(values, where)


def _datatype(tensor: InputTensor, name: Any) -> Datatype:
    datatype = NUMERIC_DATATYPES.get(name) if type(name) is str else None
    if datatype is None or name not in tensor.accepted:
        if type(name) is not str or name not in ALL_DATATYPES:
            raise TensorError(f"input '{tensor.name}': unknown datatype {name!r}")
        check_datatype(tensor, name)
    assert datatype is not None  # every accepted datatype is numeric today
    return datatype


def _binary_input(
    tensor: InputTensor,
    entry: dict[str, Any],
    binary: bytes,
    offset: int,
    size: Any,
    datatype: Datatype,
    shape: tuple[int, int],
) -> npt.NDArray[Any]:
    where = f"input '{tensor.name}'"
    _check_binary_size(where, entry, binary, offset, size)
    return binary_tensor(binary, offset, size, datatype, shape, where)


def _check_binary_size(
    where: str, entry: dict[str, Any], binary: bytes, offset: int, size: Any
) -> None:
    if type(size) is not int or size < 0:
        raise TensorError(f"{where}: binary_data_size must be a non-negative integer")
    if "data" in entry:
        raise TensorError(f"{where}: has both data and binary_data_size")
    if offset + size > len(binary):
        raise TensorError(
            f"{where}: binary_data_size {size} goes past the end of the body "
            f"({len(binary) - offset} bytes left)"
        )


class InferenceCodec:
    """Decodes requests into feature rows and encodes predictions, for one bundle."""

    def __init__(
        self, tensors: TensorMap, model_name: str, model_version: str, max_rows: int
    ) -> None:
        self.tensors = tensors
        self.model_name = model_name
        self.model_version = model_version
        self.max_rows = max_rows
        self.n_features = sum(len(tensor.columns) for tensor in tensors.inputs)
        # The usual request, the model's one numeric matrix as JSON floats, has
        # a plain-Python decoding (see _one_json_row); None where that cannot apply.
        only = tensors.inputs[0] if len(tensors.inputs) == 1 else None
        self._matrix = only if isinstance(only, InputTensor) else None
        self._float32 = struct.Struct(f"{len(self._matrix.columns)}f") if self._matrix else None
        # JSON data of these datatypes parses as doubles (typecode "d"), as _one_json_row does.
        self._double_datatypes = frozenset(
            name
            for name, datatype in NUMERIC_DATATYPES.items()
            if datatype.typecode == "d" and only is not None and name in only.accepted
        )
        # A class answer of one row can take each output's one_row_json.
        self._one_row_json = all(output.one_row_json for output in tensors.outputs)
        # Every output, in the binary form or not: the answer when the request names none.
        self._all_outputs = {
            binary: tuple((output, binary) for output in tensors.outputs)
            for binary in (False, True)
        }

    def decode(self, body: bytes, header_length: bytes | None) -> ParsedRequest:
        header, binary = _split(body, header_length)
        try:
            request = orjson.loads(header)
        except orjson.JSONDecodeError as exc:
            raise TensorError(f"request is not valid JSON: {exc}") from None
        request = _object(request, "the request")
        request_id = request.get("id")
        if request_id is not None and type(request_id) is not str:
            raise TensorError("id must be a string")
        # Most requests carry no parameters: no empty dict made to look in.
        binary_output = "parameters" in request and _flag(
            _parameters(request, "request"), "binary_data_output", "request", False
        )
        inputs = request.get("inputs")
        one_row = None if binary else self._one_json_row(inputs)
        rows = None
        if one_row is None:
            # Booleans are numbers to the array module: only look for them when
            # the body could hold one.
            bools_possible = b"true" in header or b"false" in header
            rows = self._rows(inputs, binary, bools_possible)
        # After the inputs: a request wrong in both is told about its inputs.
        outputs = self._outputs(request.get("outputs"), binary_output)
        return ParsedRequest(request_id, outputs, rows=rows, one_row=one_row)

    def _one_json_row(self, inputs: Any) -> list[float] | None:
        """The row _rows would return for one valid row of JSON numbers, in plain
        Python floats (numpy's per-call overhead is most of a single row's
        cost); None for anything else, which _rows then decodes or rejects."""
        tensor, float32 = self._matrix, self._float32
        if tensor is None or float32 is None or type(inputs) is not list or len(inputs) != 1:
            return None
        entry = inputs[0]
        if type(entry) is not dict or entry.get("parameters") is not None:
            return None
        datatype, shape, data = entry.get("datatype"), entry.get("shape"), entry.get("data")
        columns = len(tensor.columns)
        if (
            entry.get("name") != tensor.name
            or type(datatype) is not str
            or datatype not in self._double_datatypes
            or type(shape) is not list
            or len(shape) != 2
            or type(shape[0]) is not int
            or type(shape[1]) is not int
            or shape[0] != 1
            or shape[1] != columns
            or type(data) is not list
        ):
            return None
        if len(data) == 1 and type(data[0]) is list:
            data = data[0]  # nested as the shape [1, columns]
        if len(data) != columns:
            return None
        row: list[float] = []
        for value in data:
            if type(value) is int:
                try:
                    value = float(value)  # the double the array module makes of it
                except OverflowError:
                    return None
            elif type(value) is not float:
                return None  # booleans included: the general path names them
            row.append(value)
        bounds = tensor.bounds
        # NaN fails both comparisons.
        if not (all(map(le, bounds.lower_list, row)) and all(map(le, row, bounds.upper_list))):
            return None
        if tensor.integers and any(not row[i].is_integer() for i in tensor.integers):
            return None
        # Doubles rounded to float32 once, as _assemble's astype does (a native
        # struct format converts with the same C cast).
        rounded: list[float] = list(float32.unpack(float32.pack(*row)))
        return rounded

    def _rows(self, inputs: Any, binary: bytes, bools_possible: bool) -> FloatMatrix:
        if type(inputs) is not list or not inputs:
            raise TensorError("inputs must be a non-empty array")
        by_name = self.tensors.inputs_by_name
        values: dict[str, npt.NDArray[Any]] = {}
        offset = 0
        for index, entry in enumerate(inputs):
            if type(entry) is not dict:
                raise TensorError(f"inputs[{index}] must be an object")
            name = entry.get("name")
            tensor = by_name.get(name) if type(name) is str else None
            if tensor is None:
                raise TensorError(
                    f"inputs[{index}]: unknown input {name!r}; the model takes "
                    + ", ".join(f"'{n}'" for n in by_name)
                )
            if name in values:
                raise TensorError(f"input '{name}' is given twice")
            parameters = entry.get("parameters")
            size = None
            if parameters is not None:
                size = _object(parameters, f"input '{name}' parameters").get("binary_data_size")
            if isinstance(tensor, CategoryTensor):
                values[tensor.name] = _category_input(
                    tensor, entry, binary, offset, size, self.max_rows
                )
                offset += size or 0
                continue
            datatype = _datatype(tensor, entry.get("datatype"))
            shape = _shape(tensor, entry.get("shape"), self.max_rows)
            if size is not None:
                tensor_values = _binary_input(tensor, entry, binary, offset, size, datatype, shape)
                offset += size
            elif "data" in entry:
                tensor_values = json_tensor(
                    entry["data"],
                    datatype,
                    shape,
                    f"input '{name}'",
                    tensor.feature_names,
                    bools_possible,
                    tensor.nullable,
                )
            else:
                raise TensorError(f"input '{name}': no data and no binary_data_size")
            tensor.check(tensor_values)
            values[tensor.name] = tensor_values
        if offset != len(binary):
            raise TensorError(
                f"the body has {len(binary) - offset} bytes after the binary tensor data"
            )
        if len(values) != len(by_name):
            missing = [name for name in by_name if name not in values]
            raise TensorError("missing input " + ", ".join(f"'{name}'" for name in missing))
        return self._assemble(values)

    def _assemble(self, values: dict[str, npt.NDArray[Any]]) -> FloatMatrix:
        inputs = self.tensors.inputs
        if len(inputs) == 1 and isinstance(inputs[0], InputTensor):
            return values[inputs[0].name].astype(MATRIX_DTYPE)
        first, *others = inputs
        n_rows = values[first.name].shape[0]
        for tensor in others:
            if values[tensor.name].shape[0] != n_rows:
                raise TensorError(
                    f"inputs have different row counts: '{first.name}' has {n_rows}, "
                    f"'{tensor.name}' has {values[tensor.name].shape[0]}"
                )
        # float64 as /predict builds them: category indices and integers stay exact.
        rows = np.empty((n_rows, self.n_features), dtype=np.float64)
        for tensor in inputs:
            if isinstance(tensor, CategoryTensor):
                rows[:, tensor.column] = values[tensor.name]
            else:
                rows[:, list(tensor.columns)] = values[tensor.name]
        return rows

    def _outputs(self, requested: Any, binary_default: bool) -> Sequence[tuple[OutputTensor, bool]]:
        if requested is None:
            return self._all_outputs[binary_default]
        if type(requested) is not list:
            raise TensorError("outputs must be an array")
        by_name = self.tensors.outputs_by_name
        selected: list[tuple[OutputTensor, bool]] = []
        for index, raw in enumerate(requested):
            entry = _object(raw, f"outputs[{index}]")
            name = entry.get("name")
            output = by_name.get(name) if type(name) is str else None
            if output is None:
                raise TensorError(
                    f"outputs[{index}]: unknown output {name!r}; the model has "
                    + ", ".join(f"'{n}'" for n in by_name)
                )
            if any(chosen is output for chosen, _ in selected):
                raise TensorError(f"output '{name}' is requested twice")
            where = f"output '{name}'"
            binary = _flag(_parameters(entry, where), "binary_data", where, binary_default)
            selected.append((output, binary))
        return selected

    def encode(self, request: ParsedRequest, outputs: RowOutputs) -> tuple[bytes, int | None]:
        """The response body, and the JSON header's length when binary data
        follows it, for the pipeline's outputs (one row's may be Python floats)."""
        n_rows = request.n_rows
        inference, one_row = (outputs, None) if isinstance(outputs, np.ndarray) else (None, outputs)
        encoded: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        row = None
        if n_rows == 1 and self._one_row_json:
            if one_row is None and inference is not None and inference.size <= SMALL_TENSOR:
                one_row = inference.ravel().tolist()
            if one_row is not None and len(one_row) <= SMALL_TENSOR and within_unit(one_row):
                row = one_row
                winner = winning_class(row)
        # Outputs drawn from the same values (a class's index and its name) compute them once.
        computed: dict[Callable[[Outputs], npt.NDArray[Any]], npt.NDArray[Any]] = {}
        for output, binary in request.outputs:
            entry: dict[str, Any] = {
                "name": output.name,
                "datatype": output.datatype,
                "shape": [n_rows] if output.width is None else [n_rows, output.width],
            }
            if row is not None and not binary and output.one_row_json is not None:
                entry["data"] = output.one_row_json(row, winner)
                encoded.append(entry)
                continue
            if inference is None:
                # Only now: the usual one-row answer never needs the array.
                inference = np.array((one_row,))
            values = computed.get(output.values)
            if values is None:
                values = computed[output.values] = output.values(inference)
            if binary:
                raw = output.binary(values)
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = output.json(values)
            encoded.append(entry)
        response: dict[str, Any] = {
            "model_name": self.model_name,
            "model_version": self.model_version,
        }
        if request.id is not None:
            response["id"] = request.id
        response["outputs"] = encoded
        header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
        if not chunks:
            return header, None
        return header + b"".join(chunks), len(header)
