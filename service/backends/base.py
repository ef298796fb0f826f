from __future__ import annotations

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
Row = tuple[float, ...]


class InferenceBackend(Protocol):
    name: str

    def predict(self, rows: FloatMatrix) -> Outputs:
        """Classification: probabilities (n_rows, n_classes) in manifest class order.
        Regression: predictions (n_rows,)."""
        ...
