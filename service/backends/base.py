from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatMatrix = npt.NDArray[np.float32]


class InferenceBackend(Protocol):
    name: str

    def predict_proba(self, rows: FloatMatrix) -> npt.NDArray[np.floating]:
        """Probabilities of shape (n_rows, n_classes), columns in manifest class order."""
        ...
