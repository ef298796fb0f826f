from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ModelNotLoadedError
from service.manifest import (
    Backend,
    DatasetInfo,
    EvaluationMetrics,
    FeatureSpec,
    LibraryVersions,
    Manifest,
    ParityReport,
    TargetStatistics,
    Task,
)
from service.pipeline import PredictionPipeline
from service.schemas import ErrorResponse
from service.server.rollout_record import Result, RolloutAttempt, ShadowDecision, read_record
from service.shadow.summary import ShadowSummary, shadow_summary

router = APIRouter(tags=["model"])


class DriftMetrics(BaseModel):
    enabled: bool
    reason: str | None = Field(description="Why drift is not computed, when it is not.")


class InferenceProfile(BaseModel):
    single_row_seconds: float = Field(description="One row's backend time, measured at warm-up.")
    inline_max_rows: int = Field(description="Larger batches run off the event loop.")
    micro_batching: bool


class Rollouts(BaseModel):
    last_attempt: RolloutAttempt | None
    counts: dict[Result, int]
    shadow: ShadowDecision | None = Field(
        description="The master's last decision about a shadow candidate (accepted, "
        "refused with its reason, or off)."
    )


class ModelInfo(BaseModel):
    """What is serving, read from the bundle's manifest and the worker."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    task: Task
    created_at: datetime
    estimator_type: str
    estimator_module: str
    estimator_params: dict[str, Any]
    backend: Backend
    feature_names: list[str]
    features: list[FeatureSpec]
    class_labels: list[str] | None
    target_statistics: TargetStatistics | None
    dataset: DatasetInfo | None
    drift_metrics: DriftMetrics
    training_metrics: EvaluationMetrics | None
    parity: ParityReport
    libraries: LibraryVersions
    checksums: dict[str, str] = Field(description="File name → SHA-256, as verified at load.")
    inference: InferenceProfile
    max_batch_size: int
    bundle_path: str
    manifest_sha256: str
    rollout: Rollouts | None = Field(
        description="The Gunicorn master's last rollout attempt; null outside Gunicorn."
    )
    shadow: ShadowSummary | None = Field(
        description="The candidate scored in the shadow of this version, its state and its "
        "agreement so far; null when there is none."
    )


def _drift(manifest: Manifest) -> dict[str, Any]:
    if manifest.has_reference_data:
        return {"enabled": True, "reason": None}
    return {
        "enabled": False,
        "reason": "the bundle was packaged without reference data: no feature deciles or "
        "category frequencies to compare live inputs with",
    }


@router.get(
    "/model-info",
    summary="What is serving: task, estimator, features, classes, checksums",
    operation_id="get_model_info",
    response_model=None,
    responses={
        200: {"model": ModelInfo, "description": "The model serving."},
        503: {"model": ErrorResponse, "description": "Model not loaded yet."},
    },
)
async def model_info(request: Request) -> dict[str, Any]:
    pipeline: PredictionPipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise ModelNotLoadedError
    predictor = pipeline.predictor
    manifest = predictor.manifest
    return {
        "name": manifest.name,
        "version": manifest.version,
        "task": manifest.task,
        "created_at": manifest.created_at.isoformat(),
        "estimator_type": manifest.estimator.class_name,
        "estimator_module": manifest.estimator.module,
        "estimator_params": manifest.estimator.params,
        "backend": predictor.backend.name,
        "feature_names": manifest.field_names,
        "features": [f.model_dump() for f in manifest.features],
        "class_labels": manifest.classes,
        "target_statistics": (
            manifest.target_statistics.model_dump() if manifest.target_statistics else None
        ),
        "dataset": manifest.dataset.model_dump() if manifest.dataset else None,
        "drift_metrics": _drift(manifest),
        "training_metrics": manifest.metrics.model_dump() if manifest.metrics else None,
        "parity": manifest.parity.model_dump(),
        "libraries": manifest.libraries.model_dump(),
        "checksums": predictor.checksums,
        "inference": {
            "single_row_seconds": predictor.single_row_seconds,
            "inline_max_rows": predictor.inline_max_rows,
            "micro_batching": predictor.batcher is not None,
        },
        "max_batch_size": pipeline.max_batch_size,
        "bundle_path": str(predictor.bundle_path),
        "manifest_sha256": predictor.manifest_sha256,
        "rollout": _rollout(request),
        "shadow": shadow_summary(pipeline),
    }


def _rollout(request: Request) -> dict[str, Any] | None:
    """The master's last rollout attempt (None outside Gunicorn): a refused
    candidate shows here while the version above keeps serving."""
    record = read_record(getattr(request.app.state, "rollouts_dir", None))
    if record is None:
        return None
    return {
        "last_attempt": record.last.model_dump(mode="json") if record.last else None,
        "counts": record.counts,
        "shadow": record.shadow.model_dump(mode="json") if record.shadow else None,
    }
