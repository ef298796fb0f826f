"""The native scikit-learn model: a pickle, so loading it runs code.

Whoever can write MODEL_DIR can write a pickle and a manifest whose checksums
match it, so neither the manifest's backend field nor its checksums decide
what is unpickled: only a SHA-256 pinned outside MODEL_DIR (TRUSTED_MODEL_SHA256
or TRUSTED_DIGESTS_FILE, baked into the image at build time) does. This class
is the one place that unpickles, and it checks the digest of the very bytes it
loads.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Set
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends.base import FloatMatrix


class UntrustedModelError(Exception):
    """The model's digest is not pinned outside MODEL_DIR: it is never unpickled."""


class SklearnBackend:
    name = "sklearn"

    def __init__(self, model_bytes: bytes, n_classes: int, trusted_sha256: Set[str]) -> None:
        digest = hashlib.sha256(model_bytes).hexdigest()
        if digest not in trusted_sha256:
            raise UntrustedModelError(
                f"untrusted: model.joblib has sha256 {digest}, which is not pinned in "
                "TRUSTED_MODEL_SHA256 or TRUSTED_DIGESTS_FILE; a pickle runs code when "
                "loaded, so it is never loaded unpinned"
            )
        import joblib  # only once the bytes are trusted: ONNX workers never import it

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
