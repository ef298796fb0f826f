"""The ASGI application, made by `create_app()` (Gunicorn names `service.app:create_app()`).

Each worker loads its own bundle in the lifespan: under Gunicorn exactly the
one the master pinned after its trial, alone the configured or newest one.
Find it, validate the manifest, verify every checksum, load the backend, warm
it up. A failure is logged as one line naming the bundle and the reason, and
the worker still starts: not ready (503 on readiness and predictions) while it
retries with backoff. A worker never exits over a model problem, because
Gunicorn halts the whole server when a worker fails to boot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from service.auth.keyfile import KeyFileError
from service.auth.middleware import CHECK_INTERVAL_SECONDS, ApiKeyMiddleware, KeyStore
from service.bundle import BundleError
from service.capture.hook import start_payload_log, stop_payload_log
from service.compression import RequestDecompressionMiddleware
from service.errors import install_error_handlers
from service.fastpath import FastPath
from service.heap import freeze_startup_heap
from service.logs import APP_LOGGER, AccessLog, configure_logging, flush_access_logs
from service.manifest import MODEL_FILE_ONNX
from service.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from service.openapi import build_openapi
from service.pipeline import PredictionPipeline
from service.predictor import Predictor, load_predictor, start_micro_batching
from service.routes import health, model_info
from service.routes.public import OpenPaths, open_paths
from service.routes.table import FAST_ROUTES
from service.settings import ServiceSettings
from service.shadow.candidate import load_shadow
from service.shedding import LoadSheddingMiddleware

if TYPE_CHECKING:
    from service.metrics.instruments import ModelMetrics

log = logging.getLogger(APP_LOGGER)


class StartupRefusedError(RuntimeError):
    """Raised from the lifespan so the worker refuses to start; already logged."""


# Seconds between attempts to load a bundle that failed: doubling, capped.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


def model_metrics(predictor: Predictor) -> ModelMetrics:
    from service.metrics.instruments import ModelMetrics

    native = predictor.manifest.native_model_file
    served_file = MODEL_FILE_ONNX if predictor.backend.name == "onnx" else native
    return ModelMetrics(
        predictor.manifest, predictor.backend.name, predictor.checksums[served_file]
    )


async def watch_keys(keys: KeyStore) -> None:
    """Look at the keys file in idle workers too, so api_keys_file_ok (and
    the log) say what every worker holds, not what it held at its last request."""
    while True:
        await asyncio.sleep(CHECK_INTERVAL_SECONDS)
        keys.refresh()


async def refresh_process_metrics(interval_seconds: float = 5.0) -> None:
    """Keep this worker's memory/CPU/fd gauges current for scrapes answered by its siblings."""
    from service.metrics.exposition import update_process_metrics

    while True:
        update_process_metrics()
        await asyncio.sleep(interval_seconds)


def refusal_reason(exc: Exception) -> str:
    if isinstance(exc, BundleError):
        return str(exc)
    # Not a refusal the loaders foresaw (a bug, or the disk): still one line.
    return f"model bundle refused: {type(exc).__name__}: {exc}"


async def start_serving(settings: ServiceSettings) -> PredictionPipeline:
    """Load, verify and warm up the bundle; raises BundleError if it is not servable."""
    predictor = load_predictor(settings)
    start_micro_batching(predictor, settings)
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
    pipeline = PredictionPipeline(predictor, settings.max_batch_size, metrics)
    pipeline.shadow = load_shadow(settings, predictor)
    if pipeline.shadow is not None:
        pipeline.shadow.start()
    return pipeline


async def serve_when_loaded(settings: ServiceSettings, api: FastAPI) -> None:
    """Retry a bundle that failed to load, with backoff, until it loads."""
    delay = RETRY_FIRST_SECONDS
    attempt = 1
    while True:
        await asyncio.sleep(delay)
        attempt += 1
        try:
            api.state.pipeline = await start_serving(settings)
            api.openapi_schema = None
            freeze_startup_heap()
            return
        except Exception as exc:
            delay = min(delay * 2, RETRY_MAX_SECONDS)
            log.error(
                refusal_reason(exc),
                extra={"fields": {"attempt": attempt, "retry_in_s": delay, "ready": False}},
            )


def load_keys(keys: KeyStore) -> None:
    """Refuse to start on a keys file that exists but cannot be parsed: serving
    open instead would be the wrong way to fail."""
    try:
        keys.load()
    except (KeyFileError, OSError) as exc:
        log.critical(
            f"API keys file {keys.path} unusable: {exc}",
            extra={"fields": {"file": str(keys.path)}},
        )
        raise StartupRefusedError(str(exc)) from None
    if not keys.enabled:
        log.warning(
            "auth disabled (AUTH=off): every route is open",
            extra={"fields": {"file": str(keys.path)}},
        )
    elif keys.key_ids:
        log.info(
            "auth enabled: API key required on every route but health and docs",
            extra={"fields": {"file": str(keys.path), "key_ids": keys.key_ids}},
        )
    else:
        log.warning(
            "auth enabled without a usable key: every route but health and docs answers 401"
            " until a key is added (AUTH=off runs open)",
            extra={"fields": {"file": str(keys.path), "file_ok": keys.file_ok}},
        )


def keys_file_gauge() -> Callable[[bool], None]:
    from service.metrics.instruments import API_KEYS_FILE_OK

    def record(ok: bool) -> None:
        API_KEYS_FILE_OK.set(1 if ok else 0)

    return record


class ServiceState(State):
    """app.state, its served pipeline also kept as a plain attribute.

    The fast path reads the pipeline on every request; State keeps its
    attributes in a dict behind __getattr__, which Python calls only after
    the normal lookup has failed: ~0.3 µs a read, against a dict hit here.
    """

    pipeline: PredictionPipeline | None = None

    def __setattr__(self, key: str, value: Any) -> None:
        super().__setattr__(key, value)
        if key == "pipeline":
            object.__setattr__(self, key, value)

    def __delattr__(self, key: str) -> None:
        super().__delattr__(key)
        if key == "pipeline":
            object.__delattr__(self, key)


class MlApi:
    """The ASGI application Gunicorn serves.

    Request context (id, access log, HTTP metrics), load shedding, API keys,
    the body limit, request decompression and the fast path (the prediction
    and Open Inference Protocol routes of service.routes.table) wrap the
    FastAPI app from outside, so a prediction
    skips FastAPI's per-request machinery entirely; every other route, and
    the lifespan, is FastAPI's.
    """

    def __init__(
        self,
        api: FastAPI,
        settings: ServiceSettings,
        keys: KeyStore,
        open_paths: OpenPaths,
        probe_paths: OpenPaths,
    ) -> None:
        self.api = api
        self.open_paths = open_paths
        http_metrics = None
        on_shed: Callable[[], None] | None = None
        if settings.metrics_enabled:
            from service.metrics.http import HttpMetrics
            from service.metrics.instruments import MAX_CONCURRENCY, REQUESTS_SHED

            http_metrics = HttpMetrics()
            MAX_CONCURRENCY.set(settings.max_concurrency)
            on_shed = REQUESTS_SHED.inc
        fast_path = FastPath(api, FAST_ROUTES, server_version=api.version)
        # The body limit counts the bytes on the wire, decompression the bytes they inflate to.
        inflated = RequestDecompressionMiddleware(fast_path, max_bytes=settings.max_request_bytes)
        limited = BodySizeLimitMiddleware(inflated, max_bytes=settings.max_request_bytes)
        authenticated = ApiKeyMiddleware(limited, keys, open_paths)
        # Before the key check (a refusal costs less than a key's hash) and
        # after the request context (a refusal is logged and counted). What
        # probes and Prometheus call is answered even past the bound.
        bounded = LoadSheddingMiddleware(
            authenticated, settings.max_concurrency, probe_paths, on_shed
        )
        self._asgi = RequestContextMiddleware(
            bounded, AccessLog(settings.log_level), metrics=http_metrics
        )

    @property
    def state(self) -> State:
        return self.api.state

    @property
    def router(self) -> APIRouter:
        return self.api.router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A coroutine function: that is how uvicorn tells an ASGI 3 app.
        await self._asgi(scope, receive, send)


def create_app(settings: ServiceSettings | None = None) -> MlApi:
    settings = settings or ServiceSettings()
    configure_logging(settings.log_level)

    keys = KeyStore(
        settings.api_keys_file,
        required=settings.auth_mode == "keys",
        on_file_state=keys_file_gauge() if settings.metrics_enabled else None,
        followed_every=settings.api_keys_poll_interval if settings.api_keys_url else None,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        load_keys(keys)
        try:
            payload_log = start_payload_log(settings)
        except RuntimeError as exc:
            log.critical(str(exc))
            raise StartupRefusedError(str(exc)) from None
        tasks: list[asyncio.Task[None]] = []
        if keys.enabled:
            tasks.append(asyncio.create_task(watch_keys(keys)))
        try:
            api.state.pipeline = await start_serving(settings)
        except Exception as exc:
            log.critical(
                refusal_reason(exc),
                extra={"fields": {"attempt": 1, "retry_in_s": RETRY_FIRST_SECONDS, "ready": False}},
            )
            tasks.append(asyncio.create_task(serve_when_loaded(settings, api)))
        api.openapi_schema = None  # rebuilt with this bundle's request schemas
        if settings.metrics_enabled:
            from service.metrics.buffered import flush_periodically

            tasks.append(asyncio.create_task(refresh_process_metrics()))
            tasks.append(asyncio.create_task(flush_periodically()))
        freeze_startup_heap()
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pipeline: PredictionPipeline | None = api.state.pipeline
        if pipeline is not None and pipeline.shadow is not None:
            await pipeline.shadow.stop()
        if pipeline is not None and pipeline.predictor.batcher is not None:
            await pipeline.predictor.batcher.stop()
        api.state.pipeline = None
        stop_payload_log(payload_log)
        flush_access_logs()

    docs = settings.docs != "off"
    api = FastAPI(
        title="ml-api",
        version="1.0",
        description="Predictions from a verified scikit-learn model bundle.",
        lifespan=lifespan,
        # A slash redirect is built from the Host header: a client could make
        # the service send others to any host. /predict/ is simply a 404.
        redirect_slashes=False,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    api.state = ServiceState()
    api.state.pipeline = None
    api.state.rollouts_dir = settings.prometheus_multiproc_dir
    api.state.keys = keys
    routers = [health.router, model_info.router]
    if settings.metrics_enabled:
        from service.routes import metrics as metrics_route

        routers.append(metrics_route.router)
    for router in routers:
        api.include_router(router)
    install_error_handlers(api)

    # The API description is the contract, not the model: DOCS=public leaves it open.
    opened = open_paths(api, routers, FAST_ROUTES, docs_public=settings.docs == "public")

    documented_auth: list[bool] = []

    def openapi() -> dict[str, Any]:
        # Security schemes and 401s are declared whether keys are configured or
        # not; only whether a request without a key is accepted changes.
        if documented_auth != [keys.enabled]:
            documented_auth[:] = [keys.enabled]
            api.openapi_schema = None
        return build_openapi(api, FAST_ROUTES, opened.__contains__, keys.enabled)

    api.openapi = openapi  # type: ignore[method-assign]
    # Health and /metrics: what probes and Prometheus call, cheap and few.
    probed = open_paths(api, routers, FAST_ROUTES, docs_public=False)
    return MlApi(api, settings, keys, opened, probed)
