"""The ONNX backend answers exactly as InferenceSession.run on the same float32 rows,
whichever path a call takes: the preallocated single-row binding, the ordinary run,
or the ordinary run because another thread holds the binding."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from service.backends.base import FloatMatrix, Outputs
from service.backends.onnx import OnnxBackend, SingleRowCall, new_session
from service.bundle import verify_bundle
from service.manifest import MODEL_FILE_ONNX, CategoryFeature, Manifest
from tests.support.bundles import train_bundle
from tests.support.user_models import package_mixed_regressor


@dataclass(frozen=True)
class Loaded:
    manifest: Manifest
    model_bytes: bytes
    # An independent session, called only through the public API.
    reference: ort.InferenceSession

    @property
    def n_features(self) -> int:
        return len(self.manifest.features)

    @property
    def output(self) -> str:
        info = self.manifest.onnx
        assert info is not None
        name = info.prediction_output if self.manifest.task == "regression" else None
        name = name or info.probabilities_output
        assert name is not None
        return name

    def expected(self, rows: FloatMatrix) -> Outputs:
        """InferenceSession.run on the rows as the graph takes them."""
        info = self.manifest.onnx
        assert info is not None
        feeds: dict[str, npt.NDArray[np.generic]] = {}
        if info.input_name is not None:
            feeds[info.input_name] = rows.astype(np.float32)
        else:
            assert info.column_inputs is not None
            for j, (feature, name) in enumerate(
                zip(self.manifest.features, info.column_inputs, strict=True)
            ):
                column = rows[:, j : j + 1]
                if isinstance(feature, CategoryFeature):
                    categories = np.asarray(feature.categories, dtype=object)
                    feeds[name] = categories[column.astype(np.intp)]
                else:
                    feeds[name] = column.astype(np.float32)
        answer: Outputs = self.reference.run([self.output], feeds)[0]
        return answer.reshape(-1) if self.manifest.task == "regression" else answer

    def backend(self) -> OnnxBackend:
        return OnnxBackend(self.model_bytes, self.manifest)


def _load(bundle: Path) -> Loaded:
    verified = verify_bundle(bundle)
    model_bytes = verified.files[MODEL_FILE_ONNX]
    return Loaded(verified.manifest, model_bytes, new_session(model_bytes))


@pytest.fixture(scope="module")
def classifier(trained_bundle: Path) -> Loaded:
    return _load(trained_bundle)


@pytest.fixture(scope="module")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    directory = tmp_path_factory.mktemp("regressor")
    return _load(train_bundle(directory, "--dataset", "diabetes", "--n-estimators", "20"))


@pytest.fixture(scope="module", params=["classifier", "regressor"])
def matrix_model(request: pytest.FixtureRequest) -> Loaded:
    """Both tasks of the matrix-input graphs the training CLI writes."""
    loaded: Loaded = request.getfixturevalue(request.param)
    return loaded


@pytest.fixture(scope="module")
def column_model(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """One graph input per feature, a category among them."""
    models = package_mixed_regressor(tmp_path_factory.mktemp("flats"))
    return _load(next(models.glob("*/*")))


def _rows(loaded: Loaded, n: int, seed: int) -> FloatMatrix:
    """Rows within the training range, and as many far outside it, where float32
    rounding and extreme leaves are most likely to differ between paths."""
    rng = np.random.default_rng(seed)
    columns = []
    for feature in loaded.manifest.features:
        if isinstance(feature, CategoryFeature):
            columns.append(rng.integers(0, len(feature.categories), n).astype(np.float64))
            continue
        low = feature.training_min if feature.training_min is not None else -10.0
        high = feature.training_max if feature.training_max is not None else 10.0
        inside = rng.uniform(low, high, n)
        outside = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(1, 30, n)
        columns.append(np.where(rng.random(n) < 0.5, inside, outside))
    return np.stack(columns, axis=1)


def test_onnx_runtime_still_has_the_private_attributes_the_backend_calls(
    classifier: Loaded,
) -> None:
    session = new_session(classifier.model_bytes)
    renamed = "service/backends/onnx.py calls it: renamed in this onnxruntime release?"
    assert callable(getattr(getattr(session, "_sess", None), "run", None)), f"_sess.run: {renamed}"
    assert callable(getattr(getattr(session, "_sess", None), "run_with_iobinding", None)), (
        f"_sess.run_with_iobinding: {renamed}"
    )
    assert hasattr(session.io_binding(), "_iobinding"), f"IOBinding._iobinding: {renamed}"


def test_the_preallocated_single_row_call_equals_inference_session_run_bitwise(
    matrix_model: Loaded,
) -> None:
    info = matrix_model.manifest.onnx
    assert info is not None
    assert info.input_name is not None
    session = new_session(matrix_model.model_bytes)
    call = SingleRowCall(
        session, info.input_name, matrix_model.output, matrix_model.n_features, ort.RunOptions()
    )
    for row in _rows(matrix_model, 300, seed=1):
        answer = call(row[None, :])
        assert answer is not None
        expected = matrix_model.reference.run(
            [matrix_model.output], {info.input_name: row[None, :].astype(np.float32)}
        )[0]
        assert answer.dtype == expected.dtype
        assert answer.shape == expected.shape
        assert np.array_equal(answer, expected)


@pytest.fixture
def binding_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many rows each call through a SingleRowCall carried."""
    calls: list[int] = []
    original = SingleRowCall.__call__

    def counted(self: SingleRowCall, row: FloatMatrix) -> Outputs | None:
        calls.append(row.shape[0])
        return original(self, row)

    monkeypatch.setattr(SingleRowCall, "__call__", counted)
    return calls


def test_single_rows_take_the_binding_and_equal_inference_session_run(
    matrix_model: Loaded, binding_calls: list[int]
) -> None:
    backend = matrix_model.backend()
    rows = _rows(matrix_model, 300, seed=2)
    for i in range(len(rows)):
        assert np.array_equal(
            backend.predict(rows[i : i + 1]), matrix_model.expected(rows[i : i + 1])
        )
    assert binding_calls == [1] * len(rows)


@pytest.mark.parametrize("n", [2, 7, 64])
def test_several_rows_take_the_ordinary_run_and_equal_inference_session_run(
    matrix_model: Loaded, binding_calls: list[int], n: int
) -> None:
    backend = matrix_model.backend()
    rows = _rows(matrix_model, n, seed=n)
    answer = backend.predict(rows)
    assert np.array_equal(answer, matrix_model.expected(rows))
    classes = matrix_model.manifest.classes
    expected_shape = (n,) if classes is None else (n, len(classes))
    assert answer.shape == expected_shape
    assert binding_calls == []


def test_each_single_row_answer_is_the_callers_own_array(matrix_model: Loaded) -> None:
    backend = matrix_model.backend()
    rows = _rows(matrix_model, 2, seed=3)
    first = backend.predict(rows[:1])
    kept = first.copy()
    backend.predict(rows[1:])
    assert np.array_equal(first, kept)
    first[...] = -1
    assert np.array_equal(backend.predict(rows[:1]), kept)


def test_a_row_arriving_while_the_binding_is_busy_takes_the_ordinary_run(
    matrix_model: Loaded,
) -> None:
    backend = matrix_model.backend()
    rows = _rows(matrix_model, 20, seed=4)
    single = backend._single
    assert single is not None
    with single.lock:
        answers = [backend.predict(rows[i : i + 1]) for i in range(len(rows))]
    for i, answer in enumerate(answers):
        assert np.array_equal(answer, matrix_model.expected(rows[i : i + 1]))


def test_single_rows_from_many_threads_each_get_their_own_exact_answer(
    matrix_model: Loaded,
) -> None:
    backend = matrix_model.backend()
    threads, per_thread = 8, 400
    rows = _rows(matrix_model, threads * per_thread, seed=5)
    expected = matrix_model.expected(rows)
    answers: list[list[Outputs]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def hammer(t: int) -> None:
        try:
            start.wait()
            for i in range(t, len(rows), threads):
                answers[t].append(backend.predict(rows[i : i + 1]))
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    workers = [threading.Thread(target=hammer, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []
    for t in range(threads):
        got = np.concatenate(answers[t])
        assert np.array_equal(got, expected[t::threads]), f"thread {t} got another row's answer"


@pytest.mark.parametrize("n", [1, 2, 50])
def test_column_input_models_equal_inference_session_run_without_the_binding(
    column_model: Loaded, binding_calls: list[int], n: int
) -> None:
    info = column_model.manifest.onnx
    assert info is not None
    assert info.column_inputs is not None
    backend = column_model.backend()
    rows = _rows(column_model, n, seed=6)
    for _ in range(2):
        assert np.array_equal(backend.predict(rows), column_model.expected(rows))
    assert binding_calls == []


def test_a_classifiers_row_call_equals_inference_session_run_as_floats(
    classifier: Loaded,
) -> None:
    backend = classifier.backend()
    for row in _rows(classifier, 300, seed=7):
        answer = backend.predict_row(tuple(row.tolist()))
        assert answer is not None
        assert list(answer) == classifier.expected(row[None, :])[0].tolist()
        assert all(type(value) is float for value in answer)


def test_regressors_and_column_fed_models_decline_the_row_call(
    regressor: Loaded, column_model: Loaded
) -> None:
    for loaded in (regressor, column_model):
        row = tuple(_rows(loaded, 1, seed=8)[0].tolist())
        assert loaded.backend().predict_row(row) is None


def test_the_row_call_declines_while_the_binding_is_busy(classifier: Loaded) -> None:
    backend = classifier.backend()
    row = tuple(_rows(classifier, 1, seed=9)[0].tolist())
    single = backend._single
    assert single is not None
    with single.lock:
        assert backend.predict_row(row) is None
    assert backend.predict_row(row) is not None
