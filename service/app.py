"""The FastAPI application: `create_app()` for tests, module-level `app` for Gunicorn.

Each worker loads its own bundle in the lifespan: find it, validate the
manifest, verify every checksum, load the backend, warm it up. Any failure is
logged as one line naming the bundle and the reason, and startup fails, so the
worker never serves and Gunicorn exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from service.bundle import BundleError
from service.errors import install_error_handlers
from service.fastpath import FastPath
from service.logs import APP_LOGGER, AccessLog, configure_logging
from service.manifest import MODEL_FILE_ONNX, MODEL_FILE_SKLEARN
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from service.openapi import build_openapi
from service.pipeline import PredictionPipeline
from service.predictor import Predictor, load_predictor
from service.routes import health, model_info
from service.routes.table import FAST_ROUTES
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from service.metrics.instruments import ModelMetrics

log = logging.getLogger(APP_LOGGER)


class ModelStartupError(RuntimeError):
    """Raised from the lifespan so the server refuses to start; already logged."""


def model_metrics(predictor: Predictor) -> ModelMetrics:
    from service.metrics.instruments import ModelMetrics

    served_file = MODEL_FILE_ONNX if predictor.backend.name == "onnx" else MODEL_FILE_SKLEARN
    return ModelMetrics(
        predictor.manifest, predictor.backend.name, predictor.checksums[served_file]
    )


async def refresh_process_metrics(interval_seconds: float = 5.0) -> None:
    """Keep this worker's memory/CPU/fd gauges current for scrapes answered by its siblings."""
    from service.metrics.exposition import update_process_metrics

    while True:
        update_process_metrics()
        await asyncio.sleep(interval_seconds)


async def start_serving(settings: ServiceSettings) -> PredictionPipeline:
    """Load, verify and warm up the bundle; refuse with one clear line if it is not servable."""
    try:
        predictor = load_predictor(settings)
    except BundleError as exc:
        log.critical(str(exc), extra={"fields": {"bundle": str(exc.path), "reason": exc.reason}})
        raise ModelStartupError(str(exc)) from None
    batching = settings.micro_batching
    if batching is None:
        batching = predictor.backend.name == "sklearn"
    if batching:
        predictor.enable_micro_batching(
            max_rows=settings.max_batch_size,
            wait_seconds=settings.batch_wait_ms / 1000,
            queue_size=settings.batch_queue_size,
        ).start()
    metrics = model_metrics(predictor) if settings.metrics_enabled else None
    if metrics is not None:
        predictor.on_backend_call = metrics.observe_backend_call
    manifest = predictor.manifest
    log.info(
        "model loaded",
        extra={
            "fields": {
                "bundle": str(predictor.bundle_path),
                "model": manifest.name,
                "version": manifest.version,
                "backend": predictor.backend.name,
                "single_row_us": round(predictor.single_row_seconds * 1e6, 1),
                "inline_max_rows": predictor.inline_max_rows,
                "micro_batching": predictor.batcher is not None,
            }
        },
    )
    return PredictionPipeline(predictor, settings.max_batch_size, metrics)


class MlApi:
    """The ASGI application Gunicorn serves.

    Request context (id, access log, HTTP metrics), the body limit and the
    fast path (the prediction and Open Inference Protocol routes of
    service.routes.table) wrap the FastAPI app from outside, so a prediction
    skips FastAPI's per-request machinery entirely; every other route, and
    the lifespan, is FastAPI's.
    """

    def __init__(self, api: FastAPI, settings: ServiceSettings) -> None:
        self.api = api
        http_metrics = None
        if settings.metrics_enabled:
            from service.metrics.http import HttpMetrics

            http_metrics = HttpMetrics()
        fast_path = FastPath(api, FAST_ROUTES, server_version=api.version)
        limited = BodySizeLimitMiddleware(fast_path, max_bytes=settings.max_request_bytes)
        self._asgi = RequestContextMiddleware(
            limited, AccessLog(settings.log_level), metrics=http_metrics
        )

    @property
    def state(self) -> State:
        return self.api.state

    @property
    def router(self) -> APIRouter:
        return self.api.router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)


def create_app(settings: ServiceSettings | None = None) -> MlApi:
    settings = settings or ServiceSettings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pipeline = await start_serving(settings)
        api.state.pipeline = pipeline
        api.openapi_schema = None  # rebuilt with this bundle's request schemas
        refresher = (
            asyncio.create_task(refresh_process_metrics()) if settings.metrics_enabled else None
        )
        yield
        if refresher is not None:
            refresher.cancel()
        if pipeline.predictor.batcher is not None:
            await pipeline.predictor.batcher.stop()
        api.state.pipeline = None

    api = FastAPI(
        title="ml-api",
        version="1.0",
        description="Predictions from a verified scikit-learn model bundle.",
        lifespan=lifespan,
    )
    api.state.pipeline = None
    api.include_router(health.router)
    api.include_router(model_info.router)
    if settings.metrics_enabled:
        from service.routes import metrics as metrics_route

        api.include_router(metrics_route.router)
    install_error_handlers(api)

    def openapi() -> dict[str, Any]:
        return build_openapi(api, FAST_ROUTES)

    api.openapi = openapi  # type: ignore[method-assign]
    return MlApi(api, settings)


app = create_app()
