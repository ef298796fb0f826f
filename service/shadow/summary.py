"""The shadow as /model-info and V2 model metadata show it: which candidate,
its state in this worker, and its agreement so far."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.pipeline import PredictionPipeline


class ShadowRows(BaseModel):
    agree: int
    disagree: int
    dropped: int


class ShadowSummary(BaseModel):
    version: str
    bundle_path: str
    backend: str
    state: str = Field(
        description="In the worker that answered: `scoring`, `switched_off` (it raised or "
        "hung) or `stopped`."
    )
    reason: str | None = Field(description="Why it was switched off in this worker.")
    rows: ShadowRows
    agreement: float | None = Field(description="agree / (agree + disagree); null before a row.")
    failures: int = Field(description="Workers where it was switched off.")
    workers_scoring: int | None = Field(description="Workers scoring it now; null without metrics.")
    counted_over: str = Field(
        description="`all_workers` (from the metrics) or `this_worker` (metrics off)."
    )


def shadow_summary(pipeline: PredictionPipeline) -> dict[str, Any] | None:
    scorer = pipeline.shadow
    if scorer is None:
        return None
    candidate = scorer.candidate
    counts = scorer.counts
    agree, disagree, dropped, failures = (
        counts.agree,
        counts.disagree,
        counts.dropped,
        counts.failures,
    )
    workers: int | None = None
    counted_over = "this_worker"
    if pipeline.metrics is not None:
        from service.metrics.shadow import shadow_totals

        manifest = pipeline.predictor.manifest
        totals = shadow_totals(manifest.name, manifest.version, candidate.version)
        agree, disagree, dropped, failures = (
            totals.agree,
            totals.disagree,
            totals.dropped,
            totals.failures,
        )
        workers, counted_over = totals.workers_scoring, "all_workers"
    scored = agree + disagree
    return {
        "version": candidate.version,
        "bundle_path": candidate.bundle_path,
        "backend": candidate.backend.name,
        "state": scorer.state,
        "reason": scorer.reason,
        "rows": {"agree": agree, "disagree": disagree, "dropped": dropped},
        "agreement": agree / scored if scored else None,
        "failures": failures,
        "workers_scoring": workers,
        "counted_over": counted_over,
    }
