"""A loaded, verified, warmed-up model and the policy for running it off the event loop."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from anyio import to_thread

from service.backends import InferenceBackend, load_backend
from service.backends.base import FloatMatrix, Outputs, Row
from service.batching import MicroBatcher
from service.bundle import (
    BundleError,
    VerifiedBundle,
    resolve_bundle_dir,
    verify_bundle,
    verify_pinned,
)
from service.manifest import CategoryFeature, Manifest
from service.settings import ServiceSettings

# Work longer than this on the event loop delays every other request of the
# worker by as much; beyond it, the ~50 µs thread hop is the cheaper cost.
INLINE_BUDGET_SECONDS = 0.0005


@dataclass
class Predictor:
    manifest: Manifest
    backend: InferenceBackend
    bundle_path: Path
    # Calls of up to this many rows run inline; larger ones go to a thread.
    inline_max_rows: int
    single_row_seconds: float
    # The digest of the manifest it was loaded from: pins every file of the bundle.
    manifest_sha256: str = ""
    batcher: MicroBatcher | None = None
    # Told about every backend call: rows in it and seconds it took.
    on_backend_call: Callable[[int, float], None] | None = None
    # The backend's plain-Python single-row call, when it has one.
    _row_call: Callable[[Row], Sequence[float] | None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._row_call = getattr(self.backend, "predict_row", None)

    @property
    def checksums(self) -> dict[str, str]:
        return {name: entry.sha256 for name, entry in self.manifest.files.items()}

    def enable_micro_batching(
        self, *, max_rows: int, wait_seconds: float, queue_size: int
    ) -> MicroBatcher:
        self.batcher = MicroBatcher(
            self.backend.predict,
            max_rows=max_rows,
            wait_seconds=wait_seconds,
            queue_size=queue_size,
            on_batch=self._backend_called,
        )
        return self.batcher

    def _backend_called(self, rows: int, seconds: float) -> None:
        if self.on_backend_call is not None:
            self.on_backend_call(rows, seconds)

    def predict_row(self, row: Row) -> Sequence[float] | None:
        """A classifier's probabilities for one row, inline, as floats; None when
        the backend has no such call (or it is busy) or micro-batching is on:
        the caller then takes predict()."""
        if self._row_call is None or self.batcher is not None or self.inline_max_rows < 1:
            # A row too slow for the event loop goes to a thread on predict().
            return None
        start = time.perf_counter()
        output = self._row_call(row)
        if output is not None:
            self._backend_called(1, time.perf_counter() - start)
        return output

    async def predict(self, rows: FloatMatrix) -> Outputs:
        """Probabilities (classification) or predictions (regression) for the rows."""
        if self.batcher is not None and rows.shape[0] == 1:
            return await self.batcher.predict(rows)
        start = time.perf_counter()
        if rows.shape[0] <= self.inline_max_rows:
            outputs = self.backend.predict(rows)
        else:
            outputs = await to_thread.run_sync(self.backend.predict, rows)
        self._backend_called(rows.shape[0], time.perf_counter() - start)
        return outputs


def example_row(manifest: Manifest) -> list[float]:
    """A plausible row in the backend's encoding: reference means, the most
    frequent category (listed first), or a value inside the bounds."""
    row: list[float] = []
    for feature in manifest.features:
        if isinstance(feature, CategoryFeature):
            row.append(0.0)
        elif feature.training_mean is not None:
            row.append(feature.training_mean)
        else:
            lower = feature.minimum
            if feature.exclusive_minimum is not None:
                lower = feature.exclusive_minimum + 1
            row.append(max(0.0, lower) if lower is not None else 0.0)
    return row


def start_micro_batching(predictor: Predictor, settings: ServiceSettings) -> None:
    """Unset MICRO_BATCHING: on for the sklearn backend (milliseconds a call), off for ONNX."""
    batching = settings.micro_batching
    if batching is None:
        batching = predictor.backend.name == "sklearn"
    if batching:
        predictor.enable_micro_batching(
            max_rows=settings.max_batch_size,
            wait_seconds=settings.batch_wait_ms / 1000,
            queue_size=settings.batch_queue_size,
        ).start()


def example_rows(manifest: Manifest, n_rows: int) -> FloatMatrix:
    return np.tile(np.asarray(example_row(manifest), dtype=np.float64), (n_rows, 1))


def _median_seconds(call: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def inline_row_limit(
    backend: InferenceBackend, manifest: Manifest, max_rows: int
) -> tuple[int, float]:
    """Measure this backend on this machine: how many rows fit in the inline budget."""
    one = example_rows(manifest, 1)
    single = _median_seconds(lambda: backend.predict(one), repeats=15)
    if single > INLINE_BUDGET_SECONDS:
        return 0, single
    probe_rows = min(max_rows, 100)
    if probe_rows <= 1:
        return probe_rows, single
    many = example_rows(manifest, probe_rows)
    batch = _median_seconds(lambda: backend.predict(many), repeats=5)
    per_row = max((batch - single) / (probe_rows - 1), 1e-9)
    return min(max_rows, 1 + int((INLINE_BUDGET_SECONDS - single) / per_row)), single


def warm_up(backend: InferenceBackend, manifest: Manifest, path: Path) -> None:
    """One real prediction before serving: a model that cannot answer is refused now."""
    try:
        outputs = np.asarray(backend.predict(example_rows(manifest, 2)))
    except Exception as exc:
        raise BundleError(path, f"warm-up prediction failed: {type(exc).__name__}: {exc}") from None
    expected = (2,) if manifest.classes is None else (2, len(manifest.classes))
    if outputs.shape != expected:
        raise BundleError(
            path, f"warm-up prediction has shape {outputs.shape}, expected {expected}"
        )
    if not np.all(np.isfinite(outputs)):
        raise BundleError(path, "warm-up prediction is not finite")
    if manifest.classes is not None and not np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        raise BundleError(path, "warm-up prediction returned probabilities that do not sum to 1")


def select_bundle(settings: ServiceSettings) -> VerifiedBundle:
    """Under Gunicorn, the bundle the master pinned; alone, the configured or newest one."""
    if settings.pinned_bundle is not None:
        return verify_pinned(settings.pinned_bundle, expected_name=settings.model_name)
    path = resolve_bundle_dir(settings.model_dir, settings.model_name, settings.model_version)
    return verify_bundle(path, expected_name=settings.model_name)


def load_predictor(settings: ServiceSettings) -> Predictor:
    bundle = select_bundle(settings)
    path = bundle.path
    backend = load_backend(bundle, settings.backend, settings.trusted_model_digests())
    warm_up(backend, bundle.manifest, path)
    inline_rows, single = inline_row_limit(backend, bundle.manifest, settings.max_batch_size)
    return Predictor(
        manifest=bundle.manifest,
        backend=backend,
        bundle_path=path,
        inline_max_rows=inline_rows,
        single_row_seconds=single,
        manifest_sha256=bundle.manifest_sha256,
    )
