"""Missing values in feature rows: NaN in the float rows every codec builds, and
what a model is given for them (NaN for a number; for a category, what the
notebook's pandas gave it: NaN in an object column, or the ONNX graph's
missing string)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def category_values(
    categories: npt.NDArray[Any], codes: npt.NDArray[np.floating], missing: object
) -> npt.NDArray[Any]:
    """Each row's category from its code; `missing` where the code is NaN."""
    absent = np.isnan(codes)
    if not absent.any():
        return categories[codes.astype(np.intp)]
    values = np.empty(codes.shape, dtype=object)
    values[absent] = missing
    values[~absent] = categories[codes[~absent].astype(np.intp)]
    return values
