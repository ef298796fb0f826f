"""The ONNX Runtime backend.

The only module that touches ONNX Runtime's private attributes (`InferenceSession._sess`,
`IOBinding._iobinding`): the public wrappers re-validate every call, which costs more
than the model on the single-row hot path. tests/unit/test_onnx_backend.py pins them.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.backends.base import FloatMatrix, Outputs, Row
from service.manifest import ONNX_MISSING_CATEGORY, CategoryFeature, Manifest

Feeds = dict[str, npt.NDArray[np.generic]]


def _column_feeds(manifest: Manifest, names: list[str]) -> Callable[[FloatMatrix], Feeds]:
    """One [N, 1] input per feature: float32 for numbers, the category strings back
    from their indexes for categories."""
    decoders: list[tuple[str, int, npt.NDArray[np.object_] | None]] = []
    for j, (feature, name) in enumerate(zip(manifest.features, names, strict=True)):
        values = None
        if isinstance(feature, CategoryFeature):
            values = np.asarray(feature.categories, dtype=object)
        decoders.append((name, j, values))

    def feeds(rows: FloatMatrix) -> Feeds:
        result: Feeds = {}
        for name, j, values in decoders:
            column = rows[:, j : j + 1]
            if values is None:
                result[name] = column.astype(np.float32)
                continue
            missing = np.isnan(column)
            if not missing.any():
                result[name] = values[column.astype(np.intp)]
                continue
            # A missing category (NaN) is the string the graph maps to the
            # fitted imputer's fill value.
            strings = values[np.where(missing, 0, column).astype(np.intp)]
            strings[missing] = ONNX_MISSING_CATEGORY
            result[name] = strings
        return result

    return feeds


def new_session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread per worker: Gunicorn already runs a worker per core, and
    # a single-row tree ensemble is far too small to gain from more.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
    )


class SingleRowCall:
    """A preallocated IO binding for one [1, F] row and one output: no feed dict,
    no input or output allocation per call.

    The buffers are shared, so one thread at a time: a caller that finds them
    busy gets None and takes the ordinary path rather than wait.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        input_name: str,
        output_name: str,
        n_features: int,
        run_options: ort.RunOptions,
    ) -> None:
        self.shape = (1, n_features)
        self._input = np.zeros(self.shape, dtype=np.float32)
        # The output's shape and type as the model answers one row: the declared
        # shape may be symbolic in any dimension, an answer is not.
        probe = session.run([output_name], {input_name: self._input})[0]
        self._output: Outputs = np.empty_like(probe, order="C")
        # The binding holds the numpy buffers alive and reads and writes them in place.
        self._binding = session.io_binding()
        self._binding.bind_cpu_input(input_name, self._input)
        self._binding.bind_ortvalue_output(
            output_name, ort.OrtValue.ortvalue_from_numpy(self._output)
        )
        self._iobinding = self._binding._iobinding
        self._run = session._sess.run_with_iobinding
        self._run_options = run_options
        # row() reads and writes the buffers with struct, cheaper than numpy's
        # per-call machinery. Native formats (no "<" or "=") convert with a
        # plain C cast, as numpy's float64 to float32 cast does (a finite value
        # too large becomes inf); the standard-size ones would raise instead.
        self._input_bytes = self._input.data.cast("B")
        self._pack_input = struct.Struct(f"{n_features}f").pack_into
        self._output_bytes = self._output.data.cast("B")
        code = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}.get(self._output.dtype)
        self._unpack_output = (
            struct.Struct(f"{self._output.size}{code}").unpack_from if code else None
        )
        # Held while the buffers are in use.
        self.lock = threading.Lock()

    def __call__(self, row: FloatMatrix) -> Outputs | None:
        """The output for a [1, F] row, or None while another thread runs one."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            # Converts in place exactly as rows.astype(np.float32) would.
            self._input[...] = row
            self._run(self._iobinding, self._run_options)
            # A copy: the caller keeps the array, the buffer is overwritten next call.
            return self._output.copy()
        finally:
            self.lock.release()

    def row(self, values: Sequence[float]) -> Sequence[float] | None:
        """The output for one row given as plain numbers, as plain floats, with
        no numpy call on the way; None while busy."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            self._pack_input(self._input_bytes, 0, *values)
            self._run(self._iobinding, self._run_options)
            if self._unpack_output is None:
                output: list[float] = self._output.reshape(-1).tolist()
                return output
            return self._unpack_output(self._output_bytes)
        finally:
            self.lock.release()


class OnnxBackend:
    name = "onnx"

    def __init__(self, model_bytes: bytes, manifest: Manifest) -> None:
        info = manifest.onnx
        if info is None:
            raise ValueError("the manifest has no onnx section")
        self._session = new_session(model_bytes)
        self._regression = manifest.task == "regression"
        output = info.prediction_output if self._regression else info.probabilities_output
        assert output is not None  # guaranteed by Manifest validation
        self._outputs = [output]
        # Kept: a run given None instead measured ~2 µs slower per call.
        self._run_options = ort.RunOptions()
        # The checks InferenceSession.run adds guard against feeds this class
        # never builds (missing inputs, foreign OrtValues) and a fallback for
        # GPU providers it never uses.
        self._run = self._session._sess.run
        self._single: SingleRowCall | None = None
        if info.input_name is not None:
            matrix_input = info.input_name
            self._feeds: Callable[[FloatMatrix], Feeds] = lambda rows: {
                matrix_input: rows.astype(np.float32)
            }
            self._single = SingleRowCall(
                self._session, matrix_input, output, len(manifest.features), self._run_options
            )
        else:
            assert info.column_inputs is not None  # guaranteed by Manifest validation
            self._feeds = _column_feeds(manifest, info.column_inputs)

    def predict_row(self, row: Row) -> Sequence[float] | None:
        """A classifier's probabilities for one row as floats, or None: the
        caller then takes predict() (a regressor, a model fed by columns, or
        the buffers busy in another thread)."""
        if self._single is None or self._regression:
            return None
        return self._single.row(row)

    def predict(self, rows: FloatMatrix) -> Outputs:
        outputs: Outputs | None = None
        single = self._single
        if single is not None and rows.shape == single.shape:
            outputs = single(rows)
        if outputs is None:
            outputs = self._run(self._outputs, self._feeds(rows), self._run_options)[0]
        # A regressor answers [N, 1]; the service speaks of one value per row.
        return outputs.reshape(-1) if self._regression else outputs
