"""Shadow candidates that go wrong in a worker, for the process tests.

`FaultyAfter` wraps a fitted classifier: it answers its first `healthy_calls`
calls in a process (so it passes the master's trial and its warm-up in the
worker, about twenty calls) and then raises, or sleeps on every call. Pickled
into a copy of a scikit-learn-only bundle (its digest pinned, as an operator
pins a native model); workers and the trial import this module by name.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import joblib

from tests.support.bundles import rewrite_file

HEALTHY_CALLS = 30
Fault = Literal["raise", "sleep"]


class FaultyAfter:
    def __init__(self, model: Any, fault: Fault, seconds: float = 1.0) -> None:
        self.model = model
        self.fault = fault
        self.seconds = seconds
        self.classes_ = model.classes_
        self.calls = 0

    def predict_proba(self, rows: Any) -> Any:
        self.calls += 1
        if self.calls > HEALTHY_CALLS:
            if self.fault == "raise":
                raise RuntimeError("the candidate broke")
            time.sleep(self.seconds)
        return self.model.predict_proba(rows)


def make_faulty(bundle: Path, fault: Fault) -> None:
    """Replace the bundle's native model with a faulty wrapper of it (checksums updated)."""
    model = joblib.load(bundle / "model.joblib")
    temporary = bundle / "faulty.joblib"
    joblib.dump(FaultyAfter(model, fault), temporary)
    data = temporary.read_bytes()
    temporary.unlink()
    rewrite_file(bundle, "model.joblib", data, update_checksum=True)
