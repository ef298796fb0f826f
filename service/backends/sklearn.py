"""The native scikit-learn model: a pickle, so loading it runs code, or a
skops file, which its safe loader rebuilds without running any.

Whoever can write MODEL_DIR can write a pickle and a manifest whose checksums
match it, so neither the manifest's backend field nor its checksums decide
what is unpickled: only a SHA-256 pinned outside MODEL_DIR (TRUSTED_MODEL_SHA256
or TRUSTED_DIGESTS_FILE, baked into the image at build time or recorded by
`make package`) does. `unpickle` is the one place that unpickles, and it checks
the digest of the very bytes it loads.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Set
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends.base import FloatMatrix, Outputs
from service.manifest import CategoryFeature, Manifest
from service.missing import category_values

# One OpenMP thread, like n_jobs=1 below: each worker already has a core, and
# HistGradientBoosting, LightGBM and XGBoost called from the micro-batcher's
# thread spin up a full OpenMP team per call (measured: a HistGradientBoosting
# row costs 8.6 ms from a thread by default, 1.0 ms with one thread). Read by
# the OpenMP runtime when it first loads, which is when the estimator is
# unpickled below; an explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _model_input(estimator: Any, manifest: Manifest) -> Callable[[FloatMatrix], Any]:
    """Rows as the estimator was fitted on them: the float matrix itself, or with
    categories decoded to their strings (a missing one, NaN in the matrix, to
    NaN), as a DataFrame when it was fitted on one, where a column it took as a
    pandas `category` gets that dtype over the manifest's categories."""
    categories = {
        j: np.asarray(f.categories, dtype=object)
        for j, f in enumerate(manifest.features)
        if isinstance(f, CategoryFeature)
    }
    native = {
        j
        for j, f in enumerate(manifest.features)
        if isinstance(f, CategoryFeature) and f.native_dtype == "category"
    }
    fitted_names = getattr(estimator, "feature_names_in_", None)
    if not categories and fitted_names is None:
        return lambda rows: rows
    names = manifest.feature_names

    def columns(rows: FloatMatrix) -> list[Any]:
        return [
            _decoded(categories[j], rows[:, j], native=j in native)
            if j in categories
            else rows[:, j]
            for j in range(len(names))
        ]

    if fitted_names is not None or native:
        import pandas as pd

        return lambda rows: pd.DataFrame(dict(zip(names, columns(rows), strict=True)))

    def objects(rows: FloatMatrix) -> Any:
        table = np.empty(rows.shape, dtype=object)
        for j, column in enumerate(columns(rows)):
            table[:, j] = column
        return table

    return objects


def _decoded(values: npt.NDArray[np.object_], codes: FloatMatrix, *, native: bool) -> Any:
    """A category column from its indexes into `values`; NaN is a missing value."""
    if native:
        import pandas as pd

        # from_codes takes -1 as missing: the model sees NaN, as in its DataFrame.
        index = np.where(np.isnan(codes), -1, codes).astype(np.intp)
        return pd.Categorical.from_codes(index, categories=values)
    return category_values(values, codes, np.nan)


class UntrustedModelError(Exception):
    """The model's digest is not pinned outside MODEL_DIR: it is never unpickled."""


def unpickle(model_bytes: bytes, trusted_sha256: Set[str]) -> Any:
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest not in trusted_sha256:
        raise UntrustedModelError(
            f"untrusted: model.joblib has sha256 {digest}, which is not pinned in "
            "TRUSTED_MODEL_SHA256 or TRUSTED_DIGESTS_FILE; a pickle runs code when "
            "loaded, so it is never loaded unpinned"
        )
    import joblib  # only once the bytes are trusted: ONNX workers never import it

    return joblib.load(io.BytesIO(model_bytes))


# skops trusts any type its user names; a manifest (inside MODEL_DIR) could
# name anything, so only types of the libraries a model is made of are taken.
SKOPS_TRUSTED_ROOTS = frozenset(
    {"numpy", "scipy", "sklearn", "lightgbm", "xgboost", "pandas", "collections"}
)


def load_skops(model_bytes: bytes, trusted_types: list[str]) -> Any:
    """skops' safe loader: objects of its default types and of `trusted_types`
    (the packager's user confirmed them) are rebuilt, nothing is unpickled."""
    foreign = [t for t in trusted_types if t.split(".", 1)[0] not in SKOPS_TRUSTED_ROOTS]
    if foreign:
        raise UntrustedModelError(
            f"untrusted: model.skops asks to trust {foreign}, outside the libraries "
            f"a model is made of ({', '.join(sorted(SKOPS_TRUSTED_ROOTS))})"
        )
    import skops.io

    return skops.io.loads(model_bytes, trusted=trusted_types)


class SklearnBackend:
    name = "sklearn"

    def __init__(self, estimator: Any, manifest: Manifest) -> None:
        if manifest.classes is not None:
            classes = getattr(estimator, "classes_", None)
            if classes is None or len(classes) != len(manifest.classes):
                raise ValueError(
                    f"estimator classes {classes!r} do not match the manifest's "
                    f"{len(manifest.classes)} classes"
                )
            self._method = estimator.predict_proba
        else:
            self._method = estimator.predict
        if hasattr(estimator, "n_jobs"):
            # Joblib's process/thread fan-out per call costs more than a row of
            # trees; the workers already use every core.
            estimator.set_params(n_jobs=1)
        self._input = _model_input(estimator, manifest)
        self._regression = manifest.task == "regression"
        self._estimator = estimator

    def predict(self, rows: FloatMatrix) -> Outputs:
        outputs: Outputs = np.asarray(self._method(self._input(rows)), dtype=np.float64)
        return outputs.reshape(-1) if self._regression else outputs
