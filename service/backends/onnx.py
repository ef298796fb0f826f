from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.backends.base import FloatMatrix
from service.manifest import OnnxInfo


class OnnxBackend:
    name = "onnx"

    def __init__(self, model_bytes: bytes, info: OnnxInfo) -> None:
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
        self._input = info.input_name
        self._outputs = [info.probabilities_output]

    def predict_proba(self, rows: FloatMatrix) -> npt.NDArray[np.floating]:
        probabilities: npt.NDArray[np.floating] = self._session.run(
            self._outputs, {self._input: rows}
        )[0]
        return probabilities
