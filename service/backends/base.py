from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

# One row per instance, one float32 column per feature in manifest order; a
# category is carried as the index of its value in the feature's categories.
FloatMatrix = npt.NDArray[np.float32]
Outputs = npt.NDArray[np.floating]


class InferenceBackend(Protocol):
    name: str

    def predict(self, rows: FloatMatrix) -> Outputs:
        """Classification: probabilities (n_rows, n_classes) in manifest class order.
        Regression: predictions (n_rows,)."""
        ...
