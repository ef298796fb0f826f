"""The worker's shadow: a candidate backend scoring, on its own thread, the rows
the served model already answered.

The request path only appends the rows and the primary's outputs to a list
(`submit`); a callback the event loop runs HANDOVER_SECONDS later, long
after the answer was written, hands everything gathered by then to the
shadow's thread through a queue bounded in rows. Rows beyond the bound are dropped and
counted, never waited for. The thread scores everything queued in one
candidate call, compares, and hands the result back to the event loop, where
every metric is written (backend threads never touch metrics:
service.metrics.client_internals). A candidate that raises, or whose call
outlives SHADOW_TIMEOUT (a watchdog on the event loop looks), is switched
off in this worker with one log line and a count; the thread of a hung call
is abandoned (a daemon: it cannot be interrupted, and must not hold up the
worker's exit). The primary never waits for any of it.

Whoever needs the shadow's answer for a request's rows (payload capture)
follows them (`follow`): its callback runs once on the event loop, with the
candidate's outputs once they are scored, or with why they never will be
(dropped, switched off, stopped). Followed rows wait where the rows wait, so
they are bounded by the same queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from service.backends.base import FloatMatrix, InferenceBackend, Outputs, Row
from service.logs import APP_LOGGER
from service.shadow.compare import Comparison, compare

if TYPE_CHECKING:
    from service.metrics.shadow import ShadowMetrics

log = logging.getLogger(APP_LOGGER)

State = Literal["scoring", "switched_off", "stopped"]
FailureReason = Literal["error", "timeout"]
# Rows are handed to the thread at most this often: waking it (and the event
# loop for its result) per request cost a quarter of a single-row request's
# CPU under load; gathered for 10 ms, a hand-over carries dozens of rows.
HANDOVER_SECONDS = 0.01
# What a followed request's rows came to: scored, or never scored because the
# queue was full, the shadow was switched off, or the worker is stopping.
ResultState = Literal["scored", "dropped", "switched_off", "stopped"]


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """The shadow's answer for one followed request's rows."""

    version: str
    state: ResultState
    # When scored: the candidate's outputs for those rows, and per row whether it agreed.
    outputs: Outputs | None = None
    agrees: npt.NDArray[np.bool_] | None = None


class _Follower:
    """A callback called at most once: the rows of a call can be told twice (the
    watchdog gave up on the call as it returned; the worker stopped after it
    returned), and only the first counts. Only the event loop's thread calls it."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[ShadowResult], None]) -> None:
        self._callback: Callable[[ShadowResult], None] | None = callback

    def __call__(self, result: ShadowResult) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(result)


# (rows, the primary's outputs, who follows them): a matrix and its outputs, or
# one row as Python floats and its probabilities.
Work = tuple[FloatMatrix | Row, Outputs | Sequence[float], _Follower | None]
# Followed rows' place in one candidate call: [start, stop) of its rows.
Followed = list[tuple[int, int, _Follower]]


@dataclass(frozen=True)
class ShadowCandidate:
    """The loaded candidate and what scoring it needs to know."""

    version: str
    backend: InferenceBackend
    bundle_path: str
    classifier: bool
    # The served bundle's parity tolerance (regressors).
    tolerance: float


@dataclass
class ShadowCounts:
    """This worker's tallies (the metrics hold every worker's)."""

    agree: int = 0
    disagree: int = 0
    dropped: int = 0
    failures: int = 0


def _stack(items: list[Work]) -> tuple[FloatMatrix, Outputs, Followed]:
    """One matrix of every queued row and one array of the primary's outputs, in
    the same order: single rows first, then each matrix; and where the followed
    rows are in it."""
    singles = [work for work in items if not isinstance(work[0], np.ndarray)]
    matrices = [work for work in items if isinstance(work[0], np.ndarray)]
    rows: list[FloatMatrix] = []
    outputs: list[Outputs] = []
    if singles:
        rows.append(np.array([row for row, _, _ in singles], dtype=np.float64))
        outputs.append(np.array([out for _, out, _ in singles], dtype=np.float64))
    for matrix, out, _ in matrices:
        rows.append(np.asarray(matrix, dtype=np.float64))
        outputs.append(np.asarray(out, dtype=np.float64))
    followed: Followed = []
    start = 0
    for row, _, follower in singles + matrices:
        count = _row_count(row)
        if follower is not None:
            followed.append((start, start + count, follower))
        start += count
    if len(rows) == 1:
        return rows[0], outputs[0], followed
    return np.concatenate(rows), np.concatenate(outputs), followed


def _row_count(rows: FloatMatrix | Row) -> int:
    return int(rows.shape[0]) if isinstance(rows, np.ndarray) else 1


def _followers(works: Sequence[Work]) -> list[_Follower]:
    return [follower for _, _, follower in works if follower is not None]


class ShadowScorer:
    def __init__(
        self,
        candidate: ShadowCandidate,
        *,
        queue_rows: int,
        timeout: float,
        max_rows_per_call: int,
        metrics: ShadowMetrics | None = None,
    ) -> None:
        self.candidate = candidate
        self.counts = ShadowCounts()
        self.state: State = "scoring"
        self.reason: str | None = None
        self._queue_rows = queue_rows
        self._timeout = timeout
        self._max_rows_per_call = max(1, max_rows_per_call)
        self._metrics = metrics
        # Event-loop side: what requests submitted since the last hand-over.
        self._pending: list[Work] = []
        self._handover_scheduled = False
        # Shared with the thread, under the condition's lock.
        self._ready = threading.Condition()
        self._queue: deque[Work] = deque()
        self._queued_rows = 0
        # What the thread took for its current (or last) call.
        self._taken: list[Work] = []
        # When the candidate call in progress began (monotonic), or None.
        self._call_started: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: asyncio.Task[None] | None = None

    # ------------------------------------------------------ the event loop --

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._score_forever, name="shadow", daemon=True)
        self._thread.start()
        self._watchdog = asyncio.create_task(self._watch())
        if self._metrics is not None:
            self._metrics.scoring(True)

    def submit(self, rows: FloatMatrix | Row, outputs: Outputs | Sequence[float]) -> None:
        """Called on the request path with the primary's answer: never blocks."""
        if self.state != "scoring":
            return
        self._pending.append((rows, outputs, None))
        if not self._handover_scheduled and self._loop is not None:
            self._handover_scheduled = True
            self._loop.call_later(HANDOVER_SECONDS, self._hand_over)

    def follow(
        self, outputs: Outputs | Sequence[float], on_result: Callable[[ShadowResult], None]
    ) -> None:
        """Have `on_result` called on the event loop with the shadow's result for
        the rows just submitted with these outputs (the request being answered:
        nothing awaits between its submit and this call); at once if the shadow
        holds no such rows (it was switched off or stopped before they came)."""
        follower = _Follower(on_result)
        pending = self._pending
        if pending and pending[-1][1] is outputs:
            pending[-1] = (pending[-1][0], outputs, follower)
        else:
            follower(self._unscored("dropped" if self.state == "scoring" else self.state))

    def _unscored(self, state: ResultState) -> ShadowResult:
        return ShadowResult(self.candidate.version, state)

    def _tell(self, followers: Sequence[_Follower], state: ResultState) -> None:
        if followers:
            result = self._unscored(state)
            for follower in followers:
                follower(result)

    def _hand_over(self) -> None:
        self._handover_scheduled = False
        pending, self._pending = self._pending, []
        if self.state != "scoring":
            self._tell(_followers(pending), self.state)
            return
        dropped = 0
        unqueued: list[_Follower] = []
        with self._ready:
            for work in pending:
                count = _row_count(work[0])
                if self._queued_rows + count > self._queue_rows:
                    dropped += count
                    if work[2] is not None:
                        unqueued.append(work[2])
                    continue
                self._queue.append(work)
                self._queued_rows += count
            self._ready.notify()
        if dropped:
            self._count_dropped(dropped)
        self._tell(unqueued, "dropped")

    def _count_dropped(self, rows: int) -> None:
        self.counts.dropped += rows
        if self._metrics is not None:
            self._metrics.dropped(rows)

    def _scored(
        self, comparison: Comparison, seconds: float, outputs: Outputs, followed: Followed
    ) -> None:
        if self.state != "scoring":
            # Scored before it was switched off or stopped: not counted.
            self._tell([follower for _, _, follower in followed], self.state)
            return
        self.counts.agree += comparison.agree
        self.counts.disagree += comparison.disagree
        if self._metrics is not None:
            self._metrics.observe(comparison, seconds)
        version = self.candidate.version
        for start, stop, follower in followed:
            follower(
                ShadowResult(version, "scored", outputs[start:stop], comparison.agrees[start:stop])
            )

    async def _watch(self) -> None:
        interval = min(0.1, self._timeout / 4)
        while self.state == "scoring":
            await asyncio.sleep(interval)
            started = self._call_started
            if started is not None and time.monotonic() - started > self._timeout:
                self._switch_off("timeout", f"a shadow call took longer than {self._timeout:g} s")

    def _switch_off(self, reason: FailureReason, detail: str) -> None:
        if self.state != "scoring":
            return
        self.state = "switched_off"
        self.reason = detail
        with self._ready:
            discarded = self._queued_rows
            followers = _followers([*self._taken, *self._queue])
            self._queue.clear()
            self._queued_rows = 0
            self._ready.notify()
        if discarded:
            self._count_dropped(discarded)
        self._tell(followers, "switched_off")
        self.counts.failures += 1
        if self._metrics is not None:
            self._metrics.failed(reason)
            self._metrics.scoring(False)
        log.error(
            f"shadow switched off in this worker: {detail}",
            extra={
                "fields": {
                    "shadow_version": self.candidate.version,
                    "reason": reason,
                    "bundle": self.candidate.bundle_path,
                }
            },
        )

    async def stop(self) -> None:
        if self.state == "scoring":
            self.state = "stopped"
            if self._metrics is not None:
                self._metrics.scoring(False)
        with self._ready:
            followers = _followers([*self._pending, *self._taken, *self._queue])
            self._ready.notify()
        self._pending = []
        self._tell(followers, "stopped")
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)

    # ---------------------------------------------------------- the thread --

    def _take(self) -> list[Work] | None:
        """Everything queued, up to one call's rows (at least one item); None once stopped."""
        with self._ready:
            while not self._queue and self.state == "scoring":
                self._ready.wait()
            if self.state != "scoring":
                return None
            taken: list[Work] = []
            rows = 0
            while self._queue:
                count = _row_count(self._queue[0][0])
                if taken and rows + count > self._max_rows_per_call:
                    break
                taken.append(self._queue.popleft())
                rows += count
            self._queued_rows -= rows
            self._taken = taken
            return taken

    def _score_forever(self) -> None:
        loop = self._loop
        assert loop is not None
        candidate = self.candidate
        while (work := self._take()) is not None:
            try:
                rows, primary, followed = _stack(work)
                self._call_started = started = time.monotonic()
                outputs = candidate.backend.predict(rows)
                seconds = time.monotonic() - started
                self._call_started = None
                comparison = compare(
                    primary,
                    outputs,
                    classifier=candidate.classifier,
                    tolerance=candidate.tolerance,
                )
            except Exception as exc:
                self._call_started = None
                detail = f"the shadow raised {type(exc).__name__}: {exc}"[:500]
                self._to_loop(loop, self._switch_off, "error", detail)
                return
            if self.state != "scoring":
                return  # switched off while this call hung: its answer is not counted
            if not self._to_loop(loop, self._scored, comparison, seconds, outputs, followed):
                return

    @staticmethod
    def _to_loop(
        loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object
    ) -> bool:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False  # the worker's loop has closed: it is exiting
        return True
