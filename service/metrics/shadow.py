"""The shadow candidate's metrics, labelled by the served version and the shadow's.

Agreement and dropped rows are counters, written through (exact across
workers); the difference, inference-time and regression-value histograms are
buffered like the served model's (service.metrics.buffered). Everything is
written on the event loop's thread (service.shadow.scorer hands results back
to it).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from service.manifest import Manifest, bin_edges
from service.metrics.buffered import BufferedHistogram
from service.metrics.client_internals import incrementer
from service.metrics.instruments import INFERENCE_BUCKETS
from service.metrics.store import ENV_VAR, directory_lock
from service.shadow.compare import Comparison

LABELS = ["model", "version", "shadow_version"]
# |Δ probability| (at most 1) or a relative difference: 0 is its own bucket,
# so an identical candidate shows as all rows at le="0.0".
DIFFERENCE_BUCKETS = (0.0, 1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)

SHADOW_ROWS = Counter(
    "model_shadow_rows_total",
    "Rows the shadow scored, by whether it agreed with the served version "
    "(same class; a regressor within the served bundle's parity tolerance).",
    [*LABELS, "result"],
    registry=None,
)
SHADOW_DIFFERENCE = Histogram(
    "model_shadow_difference",
    "Per row: max |Δ probability| (classifier) or |Δ prediction| / max(1, |served|) (regressor).",
    LABELS,
    buckets=DIFFERENCE_BUCKETS,
    registry=None,
)
SHADOW_PREDICTIONS = Counter(
    "model_shadow_predictions_total",
    "The shadow's predictions, by class.",
    [*LABELS, "class"],
    registry=None,
)
SHADOW_INFERENCE = Histogram(
    "model_shadow_inference_duration_seconds",
    "Time in the shadow's backend per call (one call scores every row queued).",
    [*LABELS, "backend"],
    buckets=INFERENCE_BUCKETS,
    registry=None,
)
SHADOW_DROPPED = Counter(
    "model_shadow_dropped_rows_total",
    "Rows not scored: the shadow's queue was full, or it was switched off with them queued.",
    LABELS,
    registry=None,
)
SHADOW_FAILURES = Counter(
    "model_shadow_failures_total",
    "Shadows switched off in a worker: it raised (error) or a call hung (timeout).",
    [*LABELS, "reason"],
    registry=None,
)
SHADOW_AGREEMENT_MIN = Gauge(
    "model_shadow_agreement_min",
    "SHADOW_MIN_AGREEMENT: the agreement rate below which MlApiShadowDisagreement fires.",
    LABELS,
    multiprocess_mode="livemax",
    registry=None,
)
SHADOW_SCORING = Gauge(
    "model_shadow_scoring",
    "Workers scoring the shadow now.",
    LABELS,
    multiprocess_mode="livesum",
    registry=None,
)


@functools.cache
def _value_histogram(buckets: tuple[float, ...]) -> Histogram:
    # Cached as the served model's: one object per series.
    return Histogram(
        "model_shadow_prediction_value",
        "The shadow regressor's predicted values, bucketed at its training target's deciles.",
        LABELS,
        buckets=buckets,
        registry=None,
    )


class ShadowMetrics:
    def __init__(
        self, primary: Manifest, candidate: Manifest, backend: str, min_agreement: float
    ) -> None:
        labels = (primary.name, primary.version, candidate.version)
        SHADOW_AGREEMENT_MIN.labels(*labels).set(min_agreement)
        self._agree = incrementer(SHADOW_ROWS.labels(*labels, "agree"))
        self._disagree = incrementer(SHADOW_ROWS.labels(*labels, "disagree"))
        self._dropped = incrementer(SHADOW_DROPPED.labels(*labels))
        self._failures = {
            reason: SHADOW_FAILURES.labels(*labels, reason) for reason in ("error", "timeout")
        }
        self._difference = BufferedHistogram(SHADOW_DIFFERENCE.labels(*labels))
        self._duration = BufferedHistogram(SHADOW_INFERENCE.labels(*labels, backend))
        self._by_class = [
            incrementer(SHADOW_PREDICTIONS.labels(*labels, name))
            for name in candidate.classes or ()
        ]
        self._values: BufferedHistogram | None = None
        if candidate.target_statistics is not None:
            edges = bin_edges(candidate.target_statistics.deciles)
            self._values = BufferedHistogram(_value_histogram(edges).labels(*labels))
        self._scoring = SHADOW_SCORING.labels(*labels)

    def observe(self, comparison: Comparison, seconds: float) -> None:
        if comparison.agree:
            self._agree(comparison.agree)
        if comparison.disagree:
            self._disagree(comparison.disagree)
        self._difference.add_many(comparison.differences)
        self._duration.add_one(seconds)
        answers = comparison.candidate_answers
        if self._by_class:
            counts = np.bincount(answers.astype(np.intp), minlength=len(self._by_class))
            for index, count in enumerate(counts.tolist()):
                if count:
                    self._by_class[index](count)
        elif self._values is not None:
            finite = answers[np.isfinite(answers)]
            self._values.add_many(finite.astype(np.float64))

    def dropped(self, rows: int) -> None:
        self._dropped(rows)

    def failed(self, reason: str) -> None:
        self._failures[reason].inc()

    def scoring(self, on: bool) -> None:
        self._scoring.set(1 if on else 0)


@dataclass(frozen=True)
class ShadowTotals:
    """Every worker's counts for one (served, shadow) pair, live and exited."""

    agree: int
    disagree: int
    dropped: int
    failures: int
    workers_scoring: int


def shadow_totals(model: str, version: str, shadow_version: str) -> ShadowTotals:
    """Read from the multiprocess files, as a scrape would (for /model-info)."""
    wanted = {"model": model, "version": version, "shadow_version": shadow_version}
    path = Path(os.environ[ENV_VAR])
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    sums: dict[str, float] = {}
    with directory_lock(path, exclusive=False):
        families = list(registry.collect())
    for family in families:
        for sample in family.samples:
            if not all(sample.labels.get(k) == v for k, v in wanted.items()):
                continue
            key = sample.name
            if sample.name == "model_shadow_rows_total":
                key = f"{sample.name}:{sample.labels.get('result')}"
            sums[key] = sums.get(key, 0.0) + sample.value
    return ShadowTotals(
        agree=int(sums.get("model_shadow_rows_total:agree", 0)),
        disagree=int(sums.get("model_shadow_rows_total:disagree", 0)),
        dropped=int(sums.get("model_shadow_dropped_rows_total", 0)),
        failures=int(sums.get("model_shadow_failures_total", 0)),
        workers_scoring=int(sums.get("model_shadow_scoring", 0)),
    )
