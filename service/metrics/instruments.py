"""The metrics ml-api exports. Names and labels follow the conventions public
Grafana dashboards query (http_requests_total, http_request_duration_seconds
with method/handler/status)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

from service.backends.base import winning_class
from service.manifest import CategoryFeature, Manifest, bin_edges
from service.metrics.buffered import BufferedHistogram, BufferedHistograms
from service.metrics.client_internals import incrementer

# Sub-millisecond buckets: the ONNX path answers in well under 1 ms.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
INFERENCE_BUCKETS = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
BATCH_ROW_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests answered.", ["method", "handler", "status"], registry=None
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from request start to the end of the response.",
    ["method", "handler"],
    buckets=LATENCY_BUCKETS,
    registry=None,
)
HTTP_IN_PROGRESS = Gauge(
    "http_requests_in_progress",
    "Requests being handled now (the route is only known once the request is routed).",
    ["method"],
    multiprocess_mode="livesum",
    registry=None,
)
# With http_requests_in_progress, how close an instance is to shedding
# (alert MlApiSaturated): summed over its live workers, like the requests.
MAX_CONCURRENCY = Gauge(
    "ml_api_max_concurrency",
    "Requests in progress past which a worker answers 503 (MAX_CONCURRENCY), "
    "summed over the live workers.",
    multiprocess_mode="livesum",
    registry=None,
)
REQUESTS_SHED = Counter(
    "ml_api_requests_shed_total",
    "Requests answered 503 at once because their worker had MAX_CONCURRENCY in progress.",
    registry=None,
)
INFERENCE_DURATION = Histogram(
    "model_inference_duration_seconds",
    "Time in the backend per inference call.",
    ["model", "version", "backend"],
    buckets=INFERENCE_BUCKETS,
    registry=None,
)
BATCH_ROWS = Histogram(
    "model_batch_rows",
    "Rows per inference call.",
    ["model", "version"],
    buckets=BATCH_ROW_BUCKETS,
    registry=None,
)
PREDICTIONS_METRIC = "model_predictions_total"
PREDICTIONS = Counter(
    PREDICTIONS_METRIC,
    "Predictions made, by class.",
    ["model", "version", "class"],
    registry=None,
)
# Written through (exact): a capture that silently loses requests would skew
# whatever is computed from the files.
PAYLOAD_LOG_DROPPED = Counter(
    "payload_log_dropped",
    "Sampled requests the payload log did not write: its buffer was full, or the disk refused.",
    registry=None,
)
MODEL_INFO = Gauge(
    "model_info",
    "The model bundle a live worker serves (value 1).",
    ["model", "version", "backend", "sha256"],
    multiprocess_mode="livemax",
    registry=None,
)
API_KEYS_FILE_OK = Gauge(
    "api_keys_file_ok",
    "1 while the API keys file in use is the one on disk; 0 while it is missing, "
    "empty, cut short or unparsable and the keys loaded before are kept.",
    multiprocess_mode="livemin",
    registry=None,
)
# Per-worker process figures: the default process collector reports nothing in
# multiprocess mode. "liveall" keeps one series per live worker (label pid).
RESIDENT_MEMORY = Gauge(
    "process_resident_memory_bytes",
    "Resident memory of the worker.",
    multiprocess_mode="liveall",
    registry=None,
)
CPU_SECONDS = Gauge(
    "process_cpu_seconds",
    "User and system CPU time of the worker.",
    multiprocess_mode="liveall",
    registry=None,
)
OPEN_FDS = Gauge(
    "process_open_fds",
    "Open file descriptors of the worker.",
    multiprocess_mode="liveall",
    registry=None,
)

PREDICTION_VALUE_METRIC = "model_prediction_value"
CATEGORY_METRIC = "model_feature_category_total"
CATEGORIES = Counter(
    CATEGORY_METRIC,
    "Live category inputs, by value (the most frequent reference values; the rest as 'other').",
    ["model", "version", "feature", "value"],
    registry=None,
)
# Label values come from the manifest, never from clients; this caps how many.
MAX_CATEGORY_LABELS = 50
OTHER_CATEGORY = "other"

MISSING_METRIC = "model_feature_missing_total"
MISSING = Counter(
    MISSING_METRIC,
    "Live inputs missing a nullable feature (JSON null, a left-out field, NaN).",
    ["model", "version", "feature"],
    registry=None,
)
OUT_OF_RANGE_METRIC = "model_feature_out_of_range_total"
OUT_OF_RANGE = Counter(
    OUT_OF_RANGE_METRIC,
    "Live numeric inputs outside the reference data's minimum and maximum (accepted).",
    ["model", "version", "feature"],
    registry=None,
)

FEATURE_METRIC = "model_feature_value"
# registry=None throughout: scrapes build a fresh registry over the multiprocess
# files, and the default registry's process collector would clash by name.


def bucket_label(edge: float) -> str:
    """The `le` label value a scrape shows for a histogram bucket edge: the drift
    rules select buckets by it (service.monitoring.rules)."""
    label: str = floatToGoString(edge)
    return label


@functools.cache
def _feature_histogram(feature: str, buckets: tuple[float, ...]) -> Histogram:
    # Cached: two objects for one series would each keep their own running
    # value and overwrite each other's in the shared file.
    return Histogram(
        FEATURE_METRIC,
        "Live input values, bucketed at the training data's deciles.",
        ["model", "version", "feature"],
        buckets=buckets,
        registry=None,
    )


@functools.cache
def _prediction_histogram(buckets: tuple[float, ...]) -> Histogram:
    return Histogram(
        PREDICTION_VALUE_METRIC,
        "Predicted values of a regressor, bucketed at the training target's deciles.",
        ["model", "version"],
        buckets=buckets,
        registry=None,
    )


def _category_counters(feature: CategoryFeature, labels: tuple[str, str]) -> list[Counter]:
    """A counter per category code; past the most frequent values they share 'other'.

    Categories are listed most frequent first when the manifest has reference
    frequencies, so the named ones are the ones worth a series.
    """
    named = feature.categories[:MAX_CATEGORY_LABELS]
    counters = [CATEGORIES.labels(*labels, feature.name, value) for value in named]
    if len(feature.categories) > len(named):
        other = CATEGORIES.labels(*labels, feature.name, OTHER_CATEGORY)
        counters += [other] * (len(feature.categories) - len(named))
    return counters


class ModelMetrics:
    """Inference metrics bound to one bundle's labels.

    Histograms are buffered in the worker (statistics, not accounting:
    service.metrics.buffered); the prediction and category counters are
    written through.
    """

    def __init__(self, manifest: Manifest, backend: str, checksum: str) -> None:
        labels = (manifest.name, manifest.version)
        self._duration = BufferedHistogram(INFERENCE_DURATION.labels(*labels, backend))
        self._rows = BufferedHistogram(BATCH_ROWS.labels(*labels))
        self._classification = manifest.task == "classification"
        self._by_class = [PREDICTIONS.labels(*labels, name) for name in manifest.classes or ()]
        self._count_class = [incrementer(counter) for counter in self._by_class]
        self._values: BufferedHistogram | None = None
        if manifest.target_statistics is not None:
            edges = bin_edges(manifest.target_statistics.deciles)
            self._values = BufferedHistogram(_prediction_histogram(edges).labels(*labels))
        # One histogram per numeric feature, bucketed at the training deciles,
        # so a dashboard reads the live share per training decile (each ~10%).
        # All share one metric name; each has its own bucket edges. Without
        # reference data a feature has no deciles and no histogram.
        self._histogram_columns: list[int] = []
        histograms: list[Histogram] = []
        self._categories: list[tuple[int, list[Counter]]] = []
        for column, feature in enumerate(manifest.features):
            if isinstance(feature, CategoryFeature):
                self._categories.append((column, _category_counters(feature, labels)))
            elif feature.deciles is not None:
                histogram = _feature_histogram(feature.name, bin_edges(feature.deciles))
                self._histogram_columns.append(column)
                histograms.append(histogram.labels(*labels, feature.name))
        self._features = BufferedHistograms(histograms, self._histogram_columns)
        # Written through, as the category counters: exact across workers.
        self._missing = [
            (column, MISSING.labels(*labels, feature.name))
            for column, feature in enumerate(manifest.features)
            if feature.nullable
        ]
        self._ranges = [
            (column, feature.training_min, feature.training_max, counter)
            for column, feature in enumerate(manifest.features)
            if not isinstance(feature, CategoryFeature)
            and feature.training_min is not None
            and feature.training_max is not None
            for counter in (OUT_OF_RANGE.labels(*labels, feature.name),)
        ]
        self._per_row = bool(
            self._histogram_columns or self._categories or self._missing or self._ranges
        )
        MODEL_INFO.labels(*labels, backend, checksum).set(1)

    def observe_backend_call(self, rows: int, seconds: float) -> None:
        self._duration.add_one(seconds)
        self._rows.add_one(rows)

    def observe_predictions(
        self, rows: npt.NDArray[np.float64], outputs: npt.NDArray[np.floating]
    ) -> None:
        if rows.shape[0] == 1:
            # The common single-row request: plain Python beats numpy's
            # per-call overhead several times over.
            if self._classification:
                self._count_class[winning_class(outputs[0].tolist())](1)
            elif self._values is not None:
                self._values.add_one(float(outputs[0]))
            if self._per_row:
                self._observe_features(rows[0].tolist())
            return
        self._observe_outputs(outputs)
        if self._histogram_columns:
            self._features.add_rows(rows)
        for column, counters in self._categories:
            codes = rows[:, column]
            codes = codes[~np.isnan(codes)].astype(np.intp)
            for code, count in enumerate(np.bincount(codes, minlength=len(counters)).tolist()):
                if count:
                    counters[code].inc(count)
        for column, counter in self._missing:
            missing = int(np.isnan(rows[:, column]).sum())
            if missing:
                counter.inc(missing)
        for column, low, high, counter in self._ranges:
            values = rows[:, column]
            outside = int(((values < low) | (values > high)).sum())
            if outside:
                counter.inc(outside)

    def observe_row(self, row: Sequence[float], probabilities: Sequence[float]) -> None:
        """One classified row, from plain Python values."""
        self._count_class[winning_class(probabilities)](1)
        if self._per_row:
            self._observe_features(row)

    def _observe_features(self, row: Sequence[float]) -> None:
        if self._histogram_columns:
            self._features.add_row(row)
        for column, counters in self._categories:
            code = row[column]
            if code == code:  # NaN (missing) is counted below, not as a category
                counters[int(code)].inc(1)
        for column, counter in self._missing:
            if row[column] != row[column]:
                counter.inc(1)
        for column, low, high, counter in self._ranges:
            # NaN fails both comparisons: a missing value is not out of range.
            if row[column] < low or row[column] > high:
                counter.inc(1)

    def _observe_outputs(self, outputs: npt.NDArray[np.floating]) -> None:
        if self._classification:
            winners = outputs.argmax(axis=1)
            for index, count in enumerate(np.bincount(winners, minlength=len(self._by_class))):
                if count:
                    self._by_class[index].inc(int(count))
        elif self._values is not None:
            self._values.add_many(outputs.astype(np.float64))
