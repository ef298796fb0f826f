"""ml-api's own prediction API, /predict and /predict/batch: its codec.

A body is parsed and validated in one pass by pydantic-core straight from
bytes into feature rows, and the answer is encoded by orjson: the model costs
microseconds, so the framework's own per-request work is what this path
avoids. The prediction between the two is service.pipeline's.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from service.backends.base import FloatMatrix, Outputs, Row, winning_class
from service.errors import ClientError
from service.schemas import RequestModels, build_request_models, row_attributes

if TYPE_CHECKING:
    from service.manifest import Manifest
    from service.pipeline import PredictionPipeline, RowOutputs

M = TypeVar("M", bound=BaseModel)
PROBABILITY_DECIMALS = 7
_SCALE = float(10**PROBABILITY_DECIMALS)
# A closed set of a thousand categories makes a long "expected one of" message;
# error bodies stay bounded.
MAX_ERROR_MESSAGE = 300


# An error body lists at most this many errors, then says how many there were.
MAX_LISTED_ERRORS = 20
# pydantic-core keeps ~1 KB per error until the whole body is validated, and
# an object's unknown keys are one error each. Bodies with more keys than this
# are validated the bounded way below (1 MiB of keys would otherwise cost
# ~150 MB); a 1,000-row batch of ordinary width stays on the direct path.
DIRECT_VALIDATION_MAX_KEYS = 16_384
_EXTRA_KEY = "Extra inputs are not permitted"


class RequestBodyError(ClientError):
    """A body that failed validation: `errors` lists the first MAX_LISTED_ERRORS
    (and a last entry saying how many more), `error_count` counts them all."""

    status = 422

    def __init__(self, errors: list[dict[str, Any]], error_count: int | None = None) -> None:
        count = len(errors) if error_count is None else error_count
        listed = errors[:MAX_LISTED_ERRORS]
        if count > len(listed):
            listed.append(
                {
                    "loc": ["body"],
                    "msg": f"{count} errors in total; the first {len(listed)} are listed",
                    "type": "too_many_errors",
                    "ctx": {"error_count": count, "listed": len(listed)},
                }
            )
        super().__init__(listed)
        self.errors = listed
        self.error_count = count


def validation_errors(
    exc: ValidationError, prefix: Sequence[str | int] = (), limit: int | None = MAX_LISTED_ERRORS
) -> list[dict[str, Any]]:
    # errors() builds every entry, so it is only called on errors bounded by
    # DIRECT_VALIDATION_MAX_KEYS, one instance, or the model's own fields.
    return [
        {
            "loc": ["body", *prefix, *error["loc"]],
            "msg": _bounded(error["msg"]),
            "type": error["type"],
        }
        for error in exc.errors(include_url=False, include_context=False, include_input=False)[
            :limit
        ]
    ]


class _Collected:
    def __init__(self) -> None:
        self.listed: list[dict[str, Any]] = []
        self.count = 0

    def add(self, errors: list[dict[str, Any]], count: int) -> None:
        self.listed.extend(errors[: MAX_LISTED_ERRORS - len(self.listed)])
        self.count += count


def _accepted_keys(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


def _known_keys_only(model: type[BaseModel], value: Any, loc: list[Any], out: _Collected) -> Any:
    """The object without keys the model forbids; each dropped key counted as pydantic would."""
    if not isinstance(value, dict):
        return value
    kept = {}
    accepted = _accepted_keys(model)
    for key, item in value.items():
        if key in accepted:
            kept[key] = item
        else:
            out.add([{"loc": ["body", *loc, key], "msg": _EXTRA_KEY, "type": "extra_forbidden"}], 1)
    return kept


def _list_fields(model: type[BaseModel]) -> dict[str, tuple[type[BaseModel], int | None]]:
    """Fields holding a list of models (the batch's instances) and their max length."""
    found: dict[str, tuple[type[BaseModel], int | None]] = {}
    for name, field in model.model_fields.items():
        args = typing.get_args(field.annotation)
        item = args[0] if args else None
        is_model = isinstance(item, type) and issubclass(item, BaseModel)
        if typing.get_origin(field.annotation) is list and is_model:
            limits = [m.max_length for m in field.metadata if hasattr(m, "max_length")]
            found[name] = (item, limits[0] if limits else None)  # type: ignore[assignment]
    return found


def _parse_bounded(model: type[M], body: bytes) -> M:
    """Validation whose memory does not grow with the number of errors in the body:
    unknown keys are dropped and counted, list items are validated one at a time."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return model.model_validate_json(body)  # not JSON: pydantic's single error
    errors = _Collected()
    data = _known_keys_only(model, data, [], errors)
    checked: set[str] = set()  # list fields whose items were validated one by one
    if isinstance(data, dict):
        for name, (item_model, limit) in _list_fields(model).items():
            items = data.get(name)
            if not isinstance(items, list) or (limit is not None and len(items) > limit):
                continue  # a single error, left to the whole-body validation below
            checked.add(name)
            for index, item in enumerate(items):
                item = items[index] = _known_keys_only(item_model, item, [name, index], errors)
                try:
                    item_model.model_validate_json(json.dumps(item))
                except ValidationError as exc:
                    errors.add(validation_errors(exc, (name, index)), exc.error_count())
    if not errors.count:
        return model.model_validate_json(json.dumps(data))
    # The rest of the body, without the lists already checked: its errors are
    # bounded by the model's own fields now that unknown keys are gone.
    rest = {k: v for k, v in data.items() if k not in checked} if isinstance(data, dict) else data
    try:
        model.model_validate_json(json.dumps(rest))
    except ValidationError as exc:
        left = [
            error
            for error in validation_errors(exc, limit=None)
            if not (error["type"] == "missing" and error["loc"][1:] in ([name] for name in checked))
        ]
        errors.add(left, len(left))
    raise RequestBodyError(errors.listed, errors.count)


def _bounded(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    return message[: MAX_ERROR_MESSAGE - 3] + "..."


def parse_body(model: type[M], body: bytes) -> M:
    try:
        if body.count(b":") > DIRECT_VALIDATION_MAX_KEYS:
            return _parse_bounded(model, body)
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestBodyError(validation_errors(exc), exc.error_count()) from None


def _row_reader(names: Sequence[str], nullable: bool) -> Callable[[BaseModel], Row]:
    # attrgetter runs in C: a thousand-row batch is read in a fraction of a millisecond.
    if len(names) == 1:
        single = operator.attrgetter(names[0])
        reader: Callable[[BaseModel], Row] = lambda instance: (single(instance),)  # noqa: E731
    else:
        reader = operator.attrgetter(*names)
    if not nullable:
        return reader
    nan = math.nan

    def with_nan(instance: BaseModel) -> Row:
        # A missing value is NaN in the rows, as numpy's float64 conversion makes it.
        return tuple(nan if value is None else value for value in reader(instance))

    return with_nan


class PredictCodec:
    """/predict's bodies to feature rows and the model's outputs to its answers, for one bundle."""

    def __init__(self, manifest: Manifest, max_batch_size: int) -> None:
        self.models: RequestModels = build_request_models(manifest, max_batch_size)
        self._instance = self.models.instance
        self._batch = self.models.batch
        nullable = any(f.nullable for f in manifest.features)
        self._read_row = _row_reader(row_attributes(manifest), nullable)
        self._class_names = list(manifest.classes or ())
        self._version = manifest.version
        self._answers: Callable[[Outputs], list[dict[str, Any]]] = (
            self.regression_predictions if manifest.task == "regression" else self.class_predictions
        )

    def decode_one(self, body: bytes) -> Row:
        return self._read_row(parse_body(self._instance, body))

    def decode_batch(self, body: bytes) -> FloatMatrix:
        return self.features(parse_body(self._batch, body).instances)  # type: ignore[attr-defined]

    def features(self, instances: Sequence[BaseModel]) -> FloatMatrix:
        if len(instances) == 1:
            return np.array((self._read_row(instances[0]),), dtype=np.float64)
        return np.array(list(map(self._read_row, instances)), dtype=np.float64)

    def encode_one(self, outputs: RowOutputs) -> bytes:
        if isinstance(outputs, np.ndarray):
            (answer,) = self._answers(outputs)
        else:
            answer = self.class_prediction(outputs)
        answer["model_version"] = self._version
        return orjson.dumps(answer)

    def encode_batch(self, outputs: Outputs) -> bytes:
        return orjson.dumps({"predictions": self._answers(outputs), "model_version": self._version})

    def class_predictions(self, probabilities: Outputs) -> list[dict[str, Any]]:
        if probabilities.shape[0] == 1:
            return [self.class_prediction(probabilities[0].tolist())]
        return self._numpy_class_predictions(probabilities)

    def _numpy_class_predictions(self, probabilities: Outputs) -> list[dict[str, Any]]:
        names = self._class_names
        winners = probabilities.argmax(axis=1)
        # Plain floats via tolist() (iterating numpy scalars costs ~10x more);
        # 7 decimals hide float32 noise such as 0.9900000095367432.
        # Clipped: float32 sums of many trees can come out at 1.0000001.
        clipped = np.clip(probabilities.astype(np.float64), 0.0, 1.0)
        rows = np.round(clipped, PROBABILITY_DECIMALS).tolist()
        return [
            {
                "predicted_class": winner,
                "predicted_class_name": names[winner],
                "confidence": row[winner],
                "probabilities": dict(zip(names, row, strict=True)),
            }
            for winner, row in zip(winners.tolist(), rows, strict=True)
        ]

    def class_prediction(self, row: Sequence[float]) -> dict[str, Any]:
        """One row the way the numpy path answers it, in plain Python (a single
        row costs several µs less); a row with NaN takes the numpy path."""
        rounded = []
        for value in row:
            if not 0.0 <= value <= 1.0:
                if value != value:
                    # float64 holds the float32 probabilities exactly: numpy's
                    # answer from them is the one from the backend's array.
                    return self._numpy_class_predictions(np.array((row,)))[0]
                value = 0.0 if value < 0.0 else 1.0
            # np.round(x, 7) is rint(x * 1e7) / 1e7; round() to an int rounds
            # half to even as rint does, and the int is exact below 2**53.
            rounded.append(round(value * _SCALE) / _SCALE)
        winner = winning_class(row)
        names = self._class_names
        return {
            "predicted_class": winner,
            "predicted_class_name": names[winner],
            "confidence": rounded[winner],
            "probabilities": dict(zip(names, rounded, strict=True)),
        }

    @staticmethod
    def regression_predictions(values: Outputs) -> list[dict[str, Any]]:
        # float32 models: the shortest repr of the float32 value, not its
        # float64 expansion (151.3 rather than 151.3000030517578).
        if values.dtype == np.float32:
            return [{"prediction": float(str(v))} for v in values]
        return [{"prediction": v} for v in values.astype(np.float64).tolist()]


@functools.lru_cache(maxsize=2)
def predict_codec(pipeline: PredictionPipeline) -> PredictCodec:
    """The codec of the bundle a pipeline serves, made once per pipeline."""
    return PredictCodec(pipeline.predictor.manifest, pipeline.max_batch_size)
