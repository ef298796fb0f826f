from __future__ import annotations

import io
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt

from service.backends.base import FloatMatrix


class SklearnBackend:
    name = "sklearn"

    def __init__(self, model_bytes: bytes, n_classes: int) -> None:
        # Only ever called with bytes whose SHA-256 matched the manifest.
        estimator: Any = joblib.load(io.BytesIO(model_bytes))
        classes = getattr(estimator, "classes_", None)
        if classes is None or list(classes) != list(range(n_classes)):
            raise ValueError(f"estimator classes {classes!r} are not 0..{n_classes - 1}")
        if hasattr(estimator, "n_jobs"):
            # Joblib's process/thread fan-out per call costs more than a row of
            # trees; the workers already use every core.
            estimator.set_params(n_jobs=1)
        self._estimator = estimator

    def predict_proba(self, rows: FloatMatrix) -> npt.NDArray[np.floating]:
        probabilities: npt.NDArray[np.floating] = self._estimator.predict_proba(rows)
        return probabilities
