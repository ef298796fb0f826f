from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.errors import ModelNotLoadedError
from service.manifest import Manifest
from service.pipeline import PredictionPipeline
from service.server.rollout_record import read_record

router = APIRouter(tags=["model"])


def _drift(manifest: Manifest) -> dict[str, Any]:
    if manifest.has_reference_data:
        return {"enabled": True, "reason": None}
    return {
        "enabled": False,
        "reason": "the bundle was packaged without reference data: no feature deciles or "
        "category frequencies to compare live inputs with",
    }


@router.get("/model-info", summary="What is serving: task, estimator, features, classes, checksums")
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
        "feature_names": manifest.feature_names,
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
    }
