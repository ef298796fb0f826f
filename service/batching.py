"""Adaptive micro-batching for backends whose per-call cost dwarfs per-row cost.

sklearn's random forest spends ~9 ms per predict_proba call whatever the row
count, so a worker answering single-row requests one call at a time tops out
near 100 requests/s. Here concurrent single-row requests queue up while a
batch computes, and the next call takes all of them (up to MAX_BATCH_SIZE
rows, waiting at most BATCH_WAIT_MS for more): under load the batch size grows
by itself, and at low load a request waits at most BATCH_WAIT_MS.

The collecting task is supervised: if it dies of anything (a bug, a failing
metrics callback), every caller waiting on it gets an InferenceError at once
instead of hanging, and a fresh task takes over the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from anyio import to_thread

from service.backends.base import FloatMatrix, Outputs
from service.errors import ServiceError
from service.logs import APP_LOGGER

log = logging.getLogger(APP_LOGGER)


class BatchQueueFullError(ServiceError):
    """Too many requests already waiting: shed load instead of growing without bound."""

    status = 503

    def __init__(self, reason: str) -> None:
        super().__init__(f"server busy: {reason}", {"retry-after": "1"})


class InferenceError(ServiceError):
    """The backend failed on a batch; every caller in it gets this. Valid inputs
    (validation runs first): only that batch's callers see it."""

    status = 500


@dataclass
class _Waiting:
    rows: FloatMatrix
    answer: asyncio.Future[Outputs]


class MicroBatcher:
    def __init__(
        self,
        infer: Callable[[FloatMatrix], Outputs],
        *,
        max_rows: int,
        wait_seconds: float,
        queue_size: int,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._infer = infer
        self.max_rows = max_rows
        self._wait_seconds = wait_seconds
        self._queue_size = queue_size
        self._on_batch = on_batch
        self._waiting: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The batch being computed: its callers are no longer in _waiting.
        self._in_flight: list[_Waiting] = []
        self._stopping = False
        self.restarts = 0

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._serve_batches(), name="micro-batcher")
        self._task.add_done_callback(self._supervise)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        log.error(
            "micro-batcher task died; failing the batch it held and restarting",
            exc_info=exc,
            extra={"fields": {"in_batch": len(self._in_flight), "queued": len(self._waiting)}},
        )
        # The batch it held cannot be answered; callers still queued (some may
        # have arrived after the failure) are served by the restarted task.
        in_flight, self._in_flight = self._in_flight, []
        error = InferenceError(f"batching failed: {type(exc).__name__}: {exc}")
        for entry in in_flight:
            if not entry.answer.done():
                entry.answer.set_exception(error)
        self.restarts += 1
        self.start()

    def _fail_everyone(self, error: InferenceError) -> None:
        waiting = [*self._in_flight, *self._waiting]
        self._in_flight = []
        self._waiting.clear()
        self._queued_rows = 0
        self._full.clear()
        for entry in waiting:
            if not entry.answer.done():
                entry.answer.set_exception(error)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_everyone(InferenceError("server shutting down"))

    async def predict(self, rows: FloatMatrix) -> Outputs:
        if len(self._waiting) >= self._queue_size:
            raise BatchQueueFullError(f"{len(self._waiting)} requests already waiting")
        answer: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(rows, answer))
        self._queued_rows += rows.shape[0]
        self._arrived.set()
        if self._queued_rows >= self.max_rows:
            self._full.set()
        return await answer

    def _take_batch(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        rows = 0
        while self._waiting and rows + self._waiting[0].rows.shape[0] <= self.max_rows:
            waiting = self._waiting.popleft()
            rows += waiting.rows.shape[0]
            if not waiting.answer.done():  # its caller may have gone away
                batch.append(waiting)
        self._queued_rows -= rows
        if self._queued_rows < self.max_rows:
            self._full.clear()
        return batch

    async def _serve_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            if self._wait_seconds > 0 and not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._wait_seconds)
            batch = self._in_flight = self._take_batch()
            if not batch:
                continue
            rows = np.concatenate([waiting.rows for waiting in batch])
            start = loop.time()
            try:
                outputs = await to_thread.run_sync(self._infer, rows)
            except Exception as exc:
                log.exception("batch inference failed", extra={"fields": {"rows": len(rows)}})
                error = InferenceError(f"inference failed: {type(exc).__name__}: {exc}")
                for waiting in batch:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(error)
                self._in_flight = []
                continue
            offset = 0
            for waiting in batch:
                count = waiting.rows.shape[0]
                if not waiting.answer.done():
                    waiting.answer.set_result(outputs[offset : offset + count])
                offset += count
            self._in_flight = []
            # After the answers: a failing callback costs a restart, not these callers.
            if self._on_batch is not None:
                self._on_batch(rows.shape[0], loop.time() - start)
