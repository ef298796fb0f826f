"""What the prediction routes call once their answer is computed, and the
worker's payload log behind it (started and stopped by the app's lifespan).

A worker serves one app, so the log is the process's: the routes reach it
without a field on every request. Unsampled, a request costs one random draw.
With a shadow scored, a sampled request's capture follows its rows to the
shadow and is handed to the writer once the shadow's result for them is back
(service.shadow.scorer); the client never waits for it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import TYPE_CHECKING, Any

from service.capture.events import Captured
from service.capture.files import RotatingFiles
from service.capture.writer import PayloadWriter
from service.errors import request_id_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from service.fastpath import FastRequest
    from service.pipeline import PredictionPipeline
    from service.settings import ServiceSettings
    from service.shadow.scorer import ShadowResult

MIB = 1024 * 1024


class PayloadLog:
    def __init__(self, writer: PayloadWriter, sample: float) -> None:
        self.writer = writer
        self.sample = sample

    def offer(
        self, request: FastRequest, pipeline: PredictionPipeline, inputs: Any, outputs: Any
    ) -> None:
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        scope = request.scope
        captured = Captured(
            request_id_of(scope) or "",
            scope["path"],
            time.time(),
            pipeline.predictor.manifest,
            inputs,
            outputs,
        )
        shadow = pipeline.shadow
        if shadow is None:
            self.writer.submit(captured)
        else:
            shadow.follow(outputs, self._with_shadow(captured))

    def _with_shadow(self, captured: Captured) -> Callable[[ShadowResult], None]:
        def submit(result: ShadowResult) -> None:
            self.writer.submit(dataclasses.replace(captured, shadow=result))

        return submit


_active: PayloadLog | None = None


def capture_payload(
    request: FastRequest, pipeline: PredictionPipeline, inputs: Any, outputs: Any
) -> None:
    """Hand a request's rows (as the backend took them) and the backend's
    outputs to the payload log, if this request is sampled."""
    payload_log = _active
    if payload_log is not None:
        payload_log.offer(request, pipeline, inputs, outputs)


def drop_counter() -> Callable[[int], None]:
    from service.metrics.client_internals import incrementer
    from service.metrics.instruments import PAYLOAD_LOG_DROPPED

    return incrementer(PAYLOAD_LOG_DROPPED)


def start_payload_log(settings: ServiceSettings) -> PayloadLog | None:
    """The worker's payload log, writing; None when capture is off."""
    global _active
    if settings.payload_log_dir is None or settings.payload_sample <= 0:
        return None
    files = RotatingFiles(
        settings.payload_log_dir,
        max_bytes=int(settings.payload_log_max_mb * MIB),
        keep_files=settings.payload_log_files,
    )
    try:
        files.open()
    except OSError as exc:
        raise RuntimeError(f"PAYLOAD_LOG_DIR {settings.payload_log_dir}: {exc}") from None
    on_drop = drop_counter() if settings.metrics_enabled else None
    writer = PayloadWriter(files, on_drop)
    writer.start()
    _active = PayloadLog(writer, settings.payload_sample)
    return _active


def stop_payload_log(payload_log: PayloadLog | None) -> None:
    """Write what is buffered and close the file."""
    global _active
    if payload_log is None:
        return
    if _active is payload_log:
        _active = None
    payload_log.writer.close()
