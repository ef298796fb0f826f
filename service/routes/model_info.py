from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.errors import ModelNotLoadedError
from service.pipeline import PredictionPipeline

router = APIRouter(tags=["model"])


@router.get("/model-info", summary="What is serving: estimator, features, classes, checksums")
async def model_info(request: Request) -> dict[str, Any]:
    pipeline: PredictionPipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise ModelNotLoadedError
    predictor = pipeline.predictor
    manifest = predictor.manifest
    return {
        "name": manifest.name,
        "version": manifest.version,
        "created_at": manifest.created_at.isoformat(),
        "estimator_type": manifest.estimator.class_name,
        "estimator_module": manifest.estimator.module,
        "estimator_params": manifest.estimator.params,
        "backend": predictor.backend.name,
        "feature_names": manifest.feature_names,
        "features": [f.model_dump() for f in manifest.features],
        "class_labels": manifest.classes,
        "training_metrics": manifest.metrics.model_dump(),
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
    }
