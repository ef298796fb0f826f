"""How a shadow candidate's outputs compare with the served model's, row by row.

Classifiers agree when they pick the same class (numpy's argmax rule, as every
answer uses); the difference is the largest |Δ probability| of the row.
Regressors agree when |candidate - primary| / max(1, |primary|) is within the
served bundle's parity tolerance, the bound its own ONNX conversion was held
to; that relative difference is also the row's difference. A row whose
difference is not a number (a NaN or an infinity from either model) disagrees
and has no difference to observe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.backends.base import Outputs

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Comparison:
    agree: int
    disagree: int
    # Per row: whether it agreed.
    agrees: npt.NDArray[np.bool_]
    # The finite differences, one per comparable row.
    differences: Floats
    # The candidate's answers: its class index per row (classifier) or its value (regressor).
    candidate_answers: npt.NDArray[np.generic]


def compare(
    primary: Outputs, candidate: Outputs, *, classifier: bool, tolerance: float
) -> Comparison:
    primary = np.asarray(primary, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if primary.shape != candidate.shape:
        raise ValueError(
            f"candidate outputs have shape {candidate.shape}, expected {primary.shape}"
        )
    if classifier:
        winners = candidate.argmax(axis=1)
        same = winners == primary.argmax(axis=1)
        differences = np.abs(candidate - primary).max(axis=1)
        answers: npt.NDArray[np.generic] = winners
    else:
        differences = np.abs(candidate - primary) / np.maximum(1.0, np.abs(primary))
        same = differences <= tolerance
        answers = candidate
    finite = np.isfinite(differences)
    agrees = same & finite
    agree = int(np.count_nonzero(agrees))
    return Comparison(
        agree=agree,
        disagree=int(primary.shape[0]) - agree,
        agrees=agrees,
        differences=differences[finite],
        candidate_answers=answers,
    )
