"""Convert the fitted model to ONNX and refuse the result unless it predicts like sklearn."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

INPUT_NAME = "input"
# Fixed so the gate is reproducible; the rows only need to cover the box.
PARITY_SEED = 20240611


@dataclass(frozen=True)
class ParityReport:
    passed: bool
    test_rows: int
    random_rows: int
    class_mismatches: int
    max_abs_probability_diff: float | None
    tolerance: float
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OnnxOutcome:
    model_bytes: bytes | None  # None: the bundle is sklearn-only
    info: dict[str, Any] | None  # the manifest's "onnx" section
    parity: ParityReport


class _GraphError(Exception):
    pass


def skipped(reason: str, tolerance: float) -> OnnxOutcome:
    """An outcome with no ONNX model and the reason recorded in the parity report."""
    report = ParityReport(False, 0, 0, 0, None, tolerance, reason)
    return OnnxOutcome(None, None, report)


def convert(model: Any, n_features: int) -> bytes:
    # Imported lazily: skl2onnx is slow to import and unused with --no-onnx.
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        # Without zipmap the probabilities are a plain [N, k] float tensor,
        # which the service reads without per-row dict allocation.
        options={id(model): {"zipmap": False}},
    )
    data: bytes = onx.SerializeToString()
    return data


def graph_info(model_bytes: bytes) -> dict[str, Any]:
    """Read opset and tensor names from the graph itself rather than trusting defaults."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    inputs = [i.name for i in proto.graph.input]
    int64 = onnx.TensorProto.INT64
    float32 = onnx.TensorProto.FLOAT
    labels = [o.name for o in proto.graph.output if o.type.tensor_type.elem_type == int64]
    probabilities = [o.name for o in proto.graph.output if o.type.tensor_type.elem_type == float32]
    if len(inputs) != 1 or len(labels) != 1 or len(probabilities) != 1:
        raise _GraphError(
            f"expected one input, one int64 and one float output; got inputs {inputs}, "
            f"outputs {[o.name for o in proto.graph.output]}"
        )
    opsets = [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")]
    if not opsets:
        raise _GraphError("graph declares no default-domain opset")
    return {
        "opset": int(max(opsets)),
        "input_name": inputs[0],
        "label_output": labels[0],
        "probabilities_output": probabilities[0],
    }


def session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Matches how the service runs it: one thread per worker process.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def random_rows(
    training_min: NDArray[np.float64], training_max: NDArray[np.float64], n: int
) -> NDArray[np.float64]:
    rng = np.random.default_rng(PARITY_SEED)
    rows: NDArray[np.float64] = rng.uniform(training_min, training_max, size=(n, len(training_min)))
    return rows


def check_parity(
    model_bytes: bytes,
    info: dict[str, Any],
    model: Any,
    x_test: NDArray[np.float64],
    probes: NDArray[np.float64],
    tolerance: float,
) -> ParityReport:
    """Compare ONNX Runtime with sklearn on the test rows and the random probe rows."""
    n_test, n_random = len(x_test), len(probes)

    def failed(reason: str, mismatches: int = 0, diff: float | None = None) -> ParityReport:
        return ParityReport(False, n_test, n_random, mismatches, diff, tolerance, reason)

    rows = np.vstack([x_test, probes]).astype(np.float32)
    try:
        sess = session(model_bytes)
        onnx_labels, onnx_proba = sess.run(
            [info["label_output"], info["probabilities_output"]], {info["input_name"]: rows}
        )
    except Exception as exc:
        return failed(f"onnxruntime failed: {_one_line(exc)}")
    # Both sides see the identical float32 values, so any difference is the
    # converter's, not input rounding.
    sk_proba = np.asarray(model.predict_proba(rows.astype(np.float64)), dtype=np.float64)
    sk_labels = np.asarray(model.classes_)[np.argmax(sk_proba, axis=1)]
    onnx_labels = np.asarray(onnx_labels).reshape(-1)
    onnx_proba = np.asarray(onnx_proba, dtype=np.float64)
    if onnx_proba.shape != sk_proba.shape or onnx_labels.shape != sk_labels.shape:
        return failed(f"output shapes differ: onnx {onnx_proba.shape}, sklearn {sk_proba.shape}")

    mismatch = onnx_labels != sk_labels
    test_mm = int(mismatch[:n_test].sum())
    random_mm = int(mismatch[n_test:].sum())
    diff = float(np.max(np.abs(onnx_proba - sk_proba)))
    problems: list[str] = []
    if test_mm:
        problems.append(f"{test_mm} class mismatches in {n_test} test rows")
    if random_mm:
        problems.append(f"{random_mm} class mismatches in {n_random} random rows")
    if not np.isfinite(diff):
        problems.append("onnx probabilities are not finite")
        diff_out: float | None = None
    else:
        diff_out = diff
        if diff > tolerance:
            problems.append(
                f"max probability difference {diff:.3g} exceeds tolerance {tolerance:g}"
            )
    if problems:
        return failed("; ".join(problems), test_mm + random_mm, diff_out)
    return ParityReport(True, n_test, n_random, 0, diff_out, tolerance, None)


def export(
    model: Any,
    x_train: NDArray[np.float64],
    x_test: NDArray[np.float64],
    *,
    parity_random_rows: int,
    tolerance: float,
) -> OnnxOutcome:
    """Convert and gate; any failure yields an sklearn-only outcome with the reason."""
    try:
        model_bytes = convert(model, x_train.shape[1])
        info = graph_info(model_bytes)
    except Exception as exc:
        return skipped(f"conversion failed: {_one_line(exc)}", tolerance)
    probes = random_rows(x_train.min(axis=0), x_train.max(axis=0), parity_random_rows)
    report = check_parity(model_bytes, info, model, x_test, probes, tolerance)
    if not report.passed:
        return OnnxOutcome(None, None, report)
    return OnnxOutcome(model_bytes, info, report)


def _one_line(exc: BaseException) -> str:
    # Converter errors can be pages long; the report and stderr want one line.
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
