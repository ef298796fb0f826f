from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

# One row per instance, one column per feature in manifest order; a category
# is carried as the index of its value in the feature's categories. float64:
# the sklearn backend sees exactly the values the client sent (an ONNX graph
# takes float32, and the parity gate measured that rounding).
FloatMatrix = npt.NDArray[np.float64]
Outputs = npt.NDArray[np.floating]


# One row's features, in manifest order (as a FloatMatrix row).
Row = Sequence[float]


def winning_class(probabilities: Sequence[float]) -> int:
    """The predicted class of one row of probabilities, by numpy's argmax rule
    (the first of equal maxima; the first NaN, which numpy counts as the
    maximum), in plain Python: every single-row answer and metric uses it."""
    total = sum(probabilities)
    if total != total:
        for index, value in enumerate(probabilities):
            if value != value:
                return index
    return probabilities.index(max(probabilities))


class InferenceBackend(Protocol):
    name: str

    def predict(self, rows: FloatMatrix) -> Outputs:
        """Classification: probabilities (n_rows, n_classes) in manifest class order.
        Regression: predictions (n_rows,)."""
        ...
