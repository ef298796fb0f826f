"""The prediction itself, whatever the protocol: feature rows in, the model's outputs out.

Each protocol's codec decodes a request into rows (or one row) and encodes
the outputs (service.predict_codec for /predict, service.v2.infer for the Open
Inference Protocol); between the two, this pipeline runs the backend and
records the prediction metrics, and hands the rows and the answer to the
shadow candidate, if one is scored (service.shadow.scorer), which scores
them after the answer is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from service.backends.base import FloatMatrix, Outputs, Row
from service.predictor import Predictor

if TYPE_CHECKING:
    from service.metrics.instruments import ModelMetrics
    from service.shadow.scorer import ShadowScorer

# One row's outputs: a classifier's probabilities as Python floats when the
# backend's row call answered, else the outputs of the one-row matrix.
RowOutputs = Sequence[float] | Outputs


class PredictionPipeline:
    def __init__(
        self, predictor: Predictor, max_batch_size: int, metrics: ModelMetrics | None = None
    ) -> None:
        self.predictor = predictor
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self._classifier = predictor.manifest.task != "regression"
        self.shadow: ShadowScorer | None = None

    async def run(self, rows: FloatMatrix) -> Outputs:
        """The backend's outputs (probabilities, or predicted values), with their metrics."""
        outputs = await self.predictor.predict(rows)
        if self.metrics is not None:
            self.metrics.observe_predictions(rows, outputs)
        if self.shadow is not None:
            self.shadow.submit(rows, outputs)
        return outputs

    def run_row_inline(self, row: Row) -> Sequence[float] | None:
        """A classifier's probabilities for one row from the backend's row call,
        in plain Python (numpy's per-call overhead is most of a row's cost),
        with their metrics; None when that call declines (see run_row).
        No coroutine: the usual single-row request awaits nothing."""
        if not self._classifier:
            return None
        probabilities = self.predictor.predict_row(row)
        if probabilities is not None:
            if self.metrics is not None:
                self.metrics.observe_row(row, probabilities)
            if self.shadow is not None:
                self.shadow.submit(row, probabilities)
        return probabilities

    async def run_row(self, row: Row, dtype: npt.DTypeLike = np.float64) -> RowOutputs:
        """One row's outputs: run_row_inline's, or those of the one-row matrix,
        made with `dtype` (the protocol's: V2 hands the backend float32, as it
        decodes tensors), when that declines: a regressor, a backend without a
        row call (sklearn, a model fed by columns), micro-batching on, a model
        too slow for the event loop, or the row call busy in another thread."""
        probabilities = self.run_row_inline(row)
        if probabilities is not None:
            return probabilities
        return await self.run_row_matrix(row, dtype)

    async def run_row_matrix(self, row: Row, dtype: npt.DTypeLike = np.float64) -> RowOutputs:
        """run_row's second way, for a caller that has tried run_row_inline already."""
        return await self.run(np.array((row,), dtype=dtype))
