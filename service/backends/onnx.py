from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.backends.base import FloatMatrix, Outputs
from service.manifest import CategoryFeature, Manifest

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
            else:
                result[name] = values[column.astype(np.intp)]
        return result

    return feeds


class OnnxBackend:
    name = "onnx"

    def __init__(self, model_bytes: bytes, manifest: Manifest) -> None:
        info = manifest.onnx
        if info is None:
            raise ValueError("the manifest has no onnx section")
        options = ort.SessionOptions()
        # One thread per worker: Gunicorn already runs a worker per core, and
        # a single-row tree ensemble is far too small to gain from more.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._regression = manifest.task == "regression"
        output = info.prediction_output if self._regression else info.probabilities_output
        self._outputs = [output]
        if info.input_name is not None:
            matrix_input = info.input_name
            self._feeds: Callable[[FloatMatrix], Feeds] = lambda rows: {
                matrix_input: rows.astype(np.float32)
            }
        else:
            assert info.column_inputs is not None  # guaranteed by Manifest validation
            self._feeds = _column_feeds(manifest, info.column_inputs)

    def predict(self, rows: FloatMatrix) -> Outputs:
        outputs: Outputs = self._session.run(self._outputs, self._feeds(rows))[0]
        # A regressor answers [N, 1]; the service speaks of one value per row.
        return outputs.reshape(-1) if self._regression else outputs
