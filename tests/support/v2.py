"""Open Inference Protocol requests and responses as tests build and read them."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.support.bundles import SETOSA, VIRGINICA

FEATURES = list(SETOSA)
ROWS = np.array([list(SETOSA.values()), list(VIRGINICA.values())], dtype=np.float32)
HEADER_LENGTH = "inference-header-content-length"
INFER = "/v2/models/iris/infer"
DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT64": np.dtype("<i8"),
}


def json_request(
    rows: npt.NDArray[Any] | list[Any], datatype: str = "FP32", **extra: Any
) -> dict[str, Any]:
    data = np.asarray(rows)
    return {
        "inputs": [
            {
                "name": "features",
                "shape": list(data.shape),
                "datatype": datatype,
                "data": data.ravel().tolist(),
            }
        ],
        **extra,
    }


def binary_request(
    rows: npt.NDArray[Any], datatype: str = "FP32", **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a binary-extension request carrying `rows` as raw bytes."""
    raw = rows.astype(rows.dtype.newbyteorder("<")).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": list(rows.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            **extra,
        }
    ).encode()
    return header + raw, {HEADER_LENGTH: str(len(header))}


def _bytes_elements(raw: bytes) -> list[str]:
    values, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        values.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return values


def read_response(body: bytes, header_length: str | None) -> dict[str, Any]:
    """The outputs by name as numpy arrays (or lists of str), from JSON or binary data."""
    length = int(header_length) if header_length is not None else len(body)
    response: dict[str, Any] = json.loads(body[:length])
    binary, offset = body[length:], 0
    outputs: dict[str, Any] = {}
    for output in response["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = output["data"]
            value: Any = (
                data
                if output["datatype"] == "BYTES"
                else np.asarray(data, dtype=DTYPES[output["datatype"]]).reshape(output["shape"])
            )
        else:
            raw = binary[offset : offset + size]
            offset += size
            if output["datatype"] == "BYTES":
                value = _bytes_elements(raw)
            else:
                dtype = DTYPES[output["datatype"]]
                value = np.frombuffer(raw, dtype=dtype).reshape(output["shape"])
        outputs[output["name"]] = value
    assert offset == len(binary)
    response["outputs"] = outputs
    return response
