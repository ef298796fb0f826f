"""Load the shadow candidate the master pinned, in a worker, beside the served model.

A candidate that cannot be loaded here (its bundle changed since the master's
trial, the disk went away) is one log line and no shadow: the served model
is never held back by it.
"""

from __future__ import annotations

import logging

from service.backends import load_backend
from service.bundle import verify_pinned
from service.logs import APP_LOGGER
from service.predictor import Predictor, warm_up
from service.settings import ServiceSettings
from service.shadow.scorer import ShadowCandidate, ShadowScorer

log = logging.getLogger(APP_LOGGER)


def load_shadow(settings: ServiceSettings, primary: Predictor) -> ShadowScorer | None:
    pin = settings.shadow_bundle
    if pin is None:
        return None
    try:
        bundle = verify_pinned(pin, expected_name=settings.model_name)
        backend = load_backend(bundle, settings.backend, settings.trusted_model_digests())
        warm_up(backend, bundle.manifest, bundle.path)
    except Exception as exc:
        log.error(
            f"shadow not loaded in this worker: {type(exc).__name__}: {exc}",
            extra={"fields": {"shadow_version": pin.version, "bundle": str(pin.path)}},
        )
        return None
    metrics = None
    if settings.metrics_enabled:
        from service.metrics.shadow import ShadowMetrics

        metrics = ShadowMetrics(
            primary.manifest, bundle.manifest, backend.name, settings.shadow_min_agreement
        )
    candidate = ShadowCandidate(
        version=bundle.manifest.version,
        backend=backend,
        bundle_path=str(bundle.path),
        classifier=primary.manifest.task != "regression",
        tolerance=primary.manifest.parity.tolerance,
    )
    log.info(
        "shadow loaded",
        extra={
            "fields": {
                "bundle": str(bundle.path),
                "shadow_version": candidate.version,
                "version": primary.manifest.version,
                "backend": backend.name,
            }
        },
    )
    return ShadowScorer(
        candidate,
        queue_rows=settings.shadow_queue_rows,
        timeout=settings.shadow_timeout,
        max_rows_per_call=settings.max_batch_size,
        metrics=metrics,
    )
