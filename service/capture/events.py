"""A captured prediction as CloudEvents 1.0 structured-mode JSON lines.

Built in the writer's thread, never on the request path: the request only
hands over references to its rows and outputs (service.capture.hook). When a
shadow candidate is scored, each row's event also carries the candidate's
answer for it, or why there is none (`data.shadow`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from service.backends.base import winning_class
from service.manifest import CategoryFeature

if TYPE_CHECKING:
    from service.manifest import Manifest
    from service.shadow.scorer import ShadowResult

SPEC_VERSION = "1.0"
EVENT_TYPE = "ml-api.prediction"
CONTENT_TYPE = "application/json"
# Probabilities as the answers round them: float32 noise hidden.
PROBABILITY_DECIMALS = 7


@dataclass(frozen=True, slots=True)
class Captured:
    """One sampled request: what the model saw and what it answered."""

    request_id: str
    # The CloudEvents source: the path the request was sent to (/predict,
    # /v2/models/iris/infer); a route matched it, so it names the served model.
    source: str
    # Seconds since the epoch, when the answer was computed.
    time: float
    manifest: Manifest
    # One row (a sequence of floats) or a matrix of rows, as the backend took them.
    inputs: Any
    # One row's probabilities, or the backend's outputs for every row.
    outputs: Any
    # The shadow's result for these rows, when a shadow is scored.
    shadow: ShadowResult | None = None


def _rows(values: Any) -> list[Any]:
    """Plain Python rows, whatever form the protocol handed the backend."""
    if isinstance(values, np.ndarray):
        listed: list[Any] = values.tolist()
        return listed if values.ndim > 1 else [listed]
    if values and isinstance(values[0], list | tuple | np.ndarray):
        return [list(row) for row in values]
    return [list(values)]


def _category(feature: CategoryFeature, code: Any) -> str | None:
    # A category travels as the index of its value (or as the value itself,
    # to a model fed by columns); NaN, a missing value, is written as null.
    if isinstance(code, str):
        return code
    if isinstance(code, float) and (math.isnan(code) or not code.is_integer()):
        return None
    index = int(code)
    return feature.categories[index] if 0 <= index < len(feature.categories) else None


def _inputs(manifest: Manifest, row: Sequence[Any]) -> dict[str, Any]:
    # orjson writes NaN (a missing number) as null.
    return {
        feature.name: _category(feature, value) if isinstance(feature, CategoryFeature) else value
        for feature, value in zip(manifest.features, row, strict=True)
    }


def _outputs(manifest: Manifest, output: Any) -> dict[str, Any]:
    if manifest.task == "regression":
        value = output[0] if isinstance(output, list) else output
        return {"prediction": float(value)}
    names = manifest.classes or []
    probabilities = [round(float(p), PROBABILITY_DECIMALS) for p in output]
    winner = winning_class(probabilities)
    return {
        "predicted_class": winner,
        "predicted_class_name": names[winner],
        "probabilities": dict(zip(names, probabilities, strict=True)),
    }


def _output_rows(manifest: Manifest, outputs: Any, rows: int) -> list[Any]:
    listed = _rows(outputs)
    if manifest.task == "regression" and len(listed) == 1 and rows > 1:
        return [[value] for value in listed[0]]  # a regressor's (n,) outputs
    return listed


def _shadow(manifest: Manifest, result: ShadowResult, rows: int) -> list[dict[str, Any]]:
    """Each row's `data.shadow`: the candidate's outputs, as `outputs` are
    written (it has the primary's task and classes), and whether it agreed;
    or only the state when its rows were never scored."""
    described = {"version": result.version, "state": result.state}
    if result.outputs is None or result.agrees is None:
        return [described] * rows
    outputs = _output_rows(manifest, result.outputs, rows)
    return [
        {**described, "agree": bool(agree), "outputs": _outputs(manifest, output)}
        for output, agree in zip(outputs, result.agrees.tolist(), strict=True)
    ]


def event_id(request_id: str, row: int, rows: int) -> str:
    """The request id the answer carried in X-Request-ID; a request of several
    rows has an event per row, and CloudEvents needs each (source, id) pair
    unique, so those are `<request id>/<row>` ("/" never occurs in a request id)."""
    return request_id if rows == 1 else f"{request_id}/{row}"


def event_lines(captured: Captured) -> list[bytes]:
    """One JSON line per row of the request, each with its newline."""
    manifest = captured.manifest
    rows = _rows(captured.inputs)
    outputs = _output_rows(manifest, captured.outputs, len(rows))
    shadow = None if captured.shadow is None else _shadow(manifest, captured.shadow, len(rows))
    moment = datetime.fromtimestamp(captured.time, UTC).isoformat().replace("+00:00", "Z")
    model = {"name": manifest.name, "version": manifest.version}
    lines = []
    for index, (row, output) in enumerate(zip(rows, outputs, strict=True)):
        data = {
            "model": model,
            "row": index,
            "inputs": _inputs(manifest, row),
            "outputs": _outputs(manifest, output),
        }
        if shadow is not None:
            data["shadow"] = shadow[index]
        event = {
            "specversion": SPEC_VERSION,
            "id": event_id(captured.request_id, index, len(rows)),
            "source": captured.source,
            "type": EVENT_TYPE,
            "time": moment,
            "datacontenttype": CONTENT_TYPE,
            # An extension attribute: the X-Request-ID of every row's event.
            "requestid": captured.request_id,
            "data": data,
        }
        lines.append(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
    return lines
