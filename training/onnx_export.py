"""Convert the fitted model to ONNX and refuse the result unless it predicts like sklearn."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.manifest import ONNX_MISSING_CATEGORY as MISSING_CATEGORY
from service.manifest import Task
from training import model_steps
from training.datasets import FeatureInfo
from training.native_categories import native_categories

INPUT_NAME = "input"
# Fixed so the gate is reproducible; the rows only need to cover the box.
PARITY_SEED = 20240611
# Classification: absolute probability difference. Regression: relative
# prediction difference |onnx - sklearn| / max(1, |sklearn|); float32 sums of
# many trees or large linear terms differ from float64 in the 7th digit.
DEFAULT_TOLERANCE: dict[Task, float] = {"classification": 1e-5, "regression": 1e-4}
# Without reference data the random rows are drawn from this box.
UNREFERENCED_RANGE = 10.0


@dataclass(frozen=True)
class ParityReport:
    passed: bool
    test_rows: int
    random_rows: int
    class_mismatches: int
    compared: str
    max_abs_diff: float | None
    max_rel_diff: float | None
    tolerance: float
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OnnxOutcome:
    model_bytes: bytes | None  # None: the bundle is sklearn-only
    info: dict[str, Any] | None  # the manifest's "onnx" section
    parity: ParityReport


@dataclass(frozen=True)
class ModelInput:
    """How the estimator takes its rows: feature kinds, whether it was fitted on a
    pandas DataFrame (then columns are selected by name), and which columns it
    took as pandas `category` dtype, with their categories.

    A missing value is NaN in the rows (numbers and categories alike): the
    estimator sees NaN, as in a notebook's DataFrame; the ONNX graph sees NaN
    for a number and MISSING_CATEGORY for a string.
    """

    features: list[FeatureInfo]
    as_frame: bool = False
    category_dtypes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def has_categories(self) -> bool:
        return any(f.kind == "category" for f in self.features)

    def for_sklearn(self, x: NDArray[Any]) -> Any:
        """Rows as the estimator expects them, with the exact values (as the service's
        sklearn backend passes them)."""
        if self.as_frame:
            import pandas as pd

            return pd.DataFrame(
                {f.name: self._native_column(x, j, f) for j, f in enumerate(self.features)}
            )
        if not self.has_categories:
            return np.asarray(x, dtype=np.float64)
        rows = np.empty(x.shape, dtype=object)
        for j, f in enumerate(self.features):
            rows[:, j] = self._column(x, j, f, missing=np.nan)
        return rows

    @property
    def categories_as_codes(self) -> bool:
        """Every category column is a pandas `category` dtype: a float matrix can
        then hold it as its code (the index into its categories, NaN for missing),
        which is what the service's rows hold for a category."""
        categories = [f.name for f in self.features if f.kind == "category"]
        return bool(categories) and all(n in self.category_dtypes for n in categories)

    def for_onnx(self, x: NDArray[Any], info: dict[str, Any]) -> dict[str, NDArray[Any]]:
        if info.get("input_name"):
            matrix = self._codes(x) if self.has_categories else np.asarray(x, dtype=np.float32)
            return {info["input_name"]: matrix}
        feeds: dict[str, NDArray[Any]] = {}
        for j, (f, name) in enumerate(zip(self.features, info["column_inputs"], strict=True)):
            column = self._column(x, j, f, missing=MISSING_CATEGORY)
            dtype = object if f.kind == "category" else np.float32
            feeds[name] = np.asarray(column, dtype=dtype).reshape(-1, 1)
        return feeds

    def _codes(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """The rows as one float32 matrix, each category as its code."""
        matrix = np.empty(x.shape, dtype=np.float32)
        for j, f in enumerate(self.features):
            if f.kind != "category":
                matrix[:, j] = np.asarray(x[:, j], dtype=np.float64)
                continue
            index = {c: float(i) for i, c in enumerate(self.category_dtypes[f.name])}
            matrix[:, j] = [np.nan if is_missing(v) else index[str(v)] for v in x[:, j]]
        return matrix

    def _native_column(self, x: NDArray[Any], j: int, f: FeatureInfo) -> Any:
        column = self._column(x, j, f, missing=np.nan)
        categories = self.category_dtypes.get(f.name)
        if categories is None:
            return column
        import pandas as pd

        return pd.Categorical(column, categories=categories)

    @staticmethod
    def _column(x: NDArray[Any], j: int, f: FeatureInfo, missing: Any) -> NDArray[Any]:
        if f.kind == "category":
            return np.asarray([missing if is_missing(v) else str(v) for v in x[:, j]], dtype=object)
        return np.asarray(x[:, j], dtype=np.float64)


def is_missing(value: Any) -> bool:
    """None or NaN: how a missing value sits in an object array of rows."""
    return value is None or (isinstance(value, float | np.floating) and bool(np.isnan(value)))


class _GraphError(Exception):
    pass


def skipped(reason: str, tolerance: float, task: Task) -> OnnxOutcome:
    """An outcome with no ONNX model and the reason recorded in the parity report."""
    report = ParityReport(False, 0, 0, 0, _compared(task), None, None, tolerance, reason)
    return OnnxOutcome(None, None, report)


def _compared(task: Task) -> str:
    return "probabilities" if task == "classification" else "predictions"


def _steps(model: Any) -> list[Any]:
    steps = getattr(model, "steps", None)
    if steps is None:
        return [model]
    return [model, *(s for _, step in steps for s in _steps(step))]


def _register_boosting_converters(model: Any) -> dict[str, int] | None:
    """XGBoost and LightGBM converters live in onnxmltools; skl2onnx learns them here,
    so they convert alone or inside a pipeline. Imported only for such models."""
    modules = {type(step).__module__.split(".")[0] for step in _steps(model)}
    if not modules & {"xgboost", "lightgbm"}:
        return None
    from skl2onnx import get_latest_tested_opset_version, update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    classifier_options = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
    if "xgboost" in modules:
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
        from xgboost import XGBClassifier, XGBRegressor

        update_registered_converter(
            XGBClassifier,
            "XGBoostXGBClassifier",
            calculate_linear_classifier_output_shapes,
            convert_xgboost,
            options=classifier_options,
        )
        update_registered_converter(
            XGBRegressor,
            "XGBoostXGBRegressor",
            calculate_linear_regressor_output_shapes,
            convert_xgboost,
        )
    if "lightgbm" in modules:
        from lightgbm import LGBMClassifier, LGBMRegressor
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm

        update_registered_converter(
            LGBMClassifier,
            "LightGbmLGBMClassifier",
            calculate_linear_classifier_output_shapes,
            convert_lightgbm,
            options=classifier_options,
        )
        update_registered_converter(
            LGBMRegressor,
            "LightGbmLGBMRegressor",
            calculate_linear_regressor_output_shapes,
            convert_lightgbm,
            options={"split": None},
        )
    # onnxmltools writes the ai.onnx.ml tree operators of version 3.
    return {"": get_latest_tested_opset_version(), "ai.onnx.ml": 3}


def convertible(model: Any) -> Any:
    """The graph to convert: the model itself, or a copy that computes the same
    where skl2onnx cannot take a step as written. The parity gate proves it.

    - onnxmltools reads XGBoost features only by the names f0, f1, ...; a model
      fitted on a DataFrame keeps column names in its booster. The copy forgets
      them (the graph takes columns by position, in manifest order).
    - A SimpleImputer on strings whose missing value is NaN (what pandas reads
      for an empty text field) has no converter; the copy's imputer replaces
      MISSING_CATEGORY instead, which the graph is fed for a missing category,
      with the same fill value (statistics_).
    """
    boosters = [s for s in _all_steps(model) if type(s).__module__.startswith("xgboost")]
    imputers = [s for s in _all_steps(model) if _nan_string_imputer(s)]
    if not boosters and not imputers:
        return model
    import copy

    model = copy.deepcopy(model)
    for step in _all_steps(model):
        if type(step).__module__.startswith("xgboost"):
            step.get_booster().feature_names = None
        elif _nan_string_imputer(step):
            step.missing_values = MISSING_CATEGORY
    return model


def _all_steps(model: Any) -> list[Any]:
    return [step for _, step in model_steps.named_steps(model)]


def _nan_string_imputer(step: Any) -> bool:
    from sklearn.impute import SimpleImputer

    if not isinstance(step, SimpleImputer) or not hasattr(step, "statistics_"):
        return False
    missing = step.missing_values
    nan = missing is None or (isinstance(missing, float) and np.isnan(missing))
    return nan and step.statistics_.dtype == object


def _column_layout(model: Any, inputs: ModelInput) -> bool:
    """Per-feature inputs when a tensor cannot hold every feature (strings beside
    numbers) or a ColumnTransformer selects columns by name."""
    from sklearn.compose import ColumnTransformer

    if _takes_codes(model, inputs):
        return False
    return inputs.has_categories or any(isinstance(s, ColumnTransformer) for s in _steps(model))


def _takes_codes(model: Any, inputs: ModelInput) -> bool:
    """LightGBM or XGBoost alone, with pandas `category` columns whose categories
    are the model's own, in its order: their categorical splits test the
    column's code (the index into LightGBM's `pandas_categorical` or XGBoost's
    recorded categories, which XGBoost recodes any DataFrame to), which
    onnxmltools converts to BRANCH_EQ nodes on that code; the graph takes the
    codes, NaN for a missing category, in one float matrix, and the parity gate
    proves it answers alike. Categories the model does not record (XGBoost
    before 3.1, or without pyarrow) leave the codes unknown: no graph then. The
    HistGradientBoosting converter does not read categorical splits (its graph
    disagrees with the model)."""
    modules = {type(step).__module__.split(".")[0] for step in _steps(model)}
    if not inputs.categories_as_codes or modules not in ({"lightgbm"}, {"xgboost"}):
        return False
    own = native_categories(model, [f.name for f in inputs.features])
    return all(own.get(name) == codes for name, codes in inputs.category_dtypes.items())


def convert(model: Any, inputs: ModelInput, task: Task) -> bytes:
    # Imported lazily: skl2onnx is slow to import and unused with --no-onnx.
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    target_opset = _register_boosting_converters(model)
    model = convertible(model)
    if _column_layout(model, inputs):
        initial_types: list[tuple[str, Any]] = [
            (
                f.name,
                StringTensorType([None, 1]) if f.kind == "category" else FloatTensorType([None, 1]),
            )
            for f in inputs.features
        ]
    else:
        initial_types = [(INPUT_NAME, FloatTensorType([None, len(inputs.features)]))]
    options: dict[int, dict[str, Any]] = {}
    if task == "classification":
        # Without zipmap the probabilities are a plain [N, k] float tensor,
        # which the service reads without per-row dict allocation.
        options = {id(_steps(model)[-1]): {"zipmap": False}}
    onx = convert_sklearn(
        model, initial_types=initial_types, options=options, target_opset=target_opset
    )
    data: bytes = onx.SerializeToString()
    return data


def graph_info(model_bytes: bytes, task: Task, n_features: int) -> dict[str, Any]:
    """Read opset and tensor names from the graph itself rather than trusting defaults."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    inputs = [i.name for i in proto.graph.input]
    float32 = onnx.TensorProto.FLOAT
    outputs = [o.name for o in proto.graph.output]
    floats = [o.name for o in proto.graph.output if o.type.tensor_type.elem_type == float32]
    others = [name for name in outputs if name not in floats]
    if len(floats) != 1 or (task == "classification" and len(others) != 1):
        raise _GraphError(f"unexpected outputs {outputs} for a {task} model")
    opsets = [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")]
    if not opsets:
        raise _GraphError("graph declares no default-domain opset")
    info: dict[str, Any] = {"opset": int(max(opsets))}
    if len(inputs) == 1 and n_features >= 1 and inputs[0] == INPUT_NAME:
        info["input_name"] = inputs[0]
    elif len(inputs) == n_features:
        info["column_inputs"] = inputs
    else:
        raise _GraphError(f"graph has inputs {inputs} for {n_features} features")
    if task == "classification":
        info |= {"label_output": others[0], "probabilities_output": floats[0]}
    else:
        info["prediction_output"] = floats[0]
    return info


def session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Matches how the service runs it: one thread per worker process.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def random_rows(specs: list[dict[str, Any]], n: int) -> NDArray[Any]:
    """Rows drawn inside each feature's reference range (or its allowed values)."""
    rng = np.random.default_rng(PARITY_SEED)
    numeric = all(s["kind"] != "category" for s in specs)
    rows = np.empty((n, len(specs)), dtype=np.float64 if numeric else object)
    for j, spec in enumerate(specs):
        if spec["kind"] == "category":
            rows[:, j] = rng.choice(np.asarray(spec["categories"], dtype=object), size=n)
            continue
        lo = spec.get("training_min", -UNREFERENCED_RANGE)
        hi = spec.get("training_max", UNREFERENCED_RANGE)
        column = rng.uniform(lo, hi, size=n)
        rows[:, j] = np.round(column) if spec["kind"] == "integer" else column
    return rows


def sklearn_outputs(model: Any, rows: Any, task: Task) -> NDArray[np.float64]:
    method = model.predict_proba if task == "classification" else model.predict
    result = np.asarray(method(rows), dtype=np.float64)
    return result if task == "classification" else result.reshape(-1)


def check_parity(
    model_bytes: bytes,
    info: dict[str, Any],
    model: Any,
    inputs: ModelInput,
    task: Task,
    x_test: NDArray[Any],
    probes: NDArray[Any],
    tolerance: float,
) -> ParityReport:
    """Compare ONNX Runtime with sklearn on the real rows and the random probe rows."""
    n_test, n_random = len(x_test), len(probes)
    compared = _compared(task)

    def report(
        reason: str | None, mismatches: int = 0, diff: float | None = None, rel: float | None = None
    ) -> ParityReport:
        return ParityReport(
            reason is None, n_test, n_random, mismatches, compared, diff, rel, tolerance, reason
        )

    rows = np.concatenate([x_test, probes]) if n_random else x_test
    output = info["probabilities_output"] if task == "classification" else info["prediction_output"]
    try:
        (onnx_out,) = session(model_bytes).run([output], inputs.for_onnx(rows, info))
    except Exception as exc:
        return report(f"onnxruntime failed: {_one_line(exc)}")
    # sklearn sees the exact values and ONNX their float32 rounding, as the
    # two backends of the service do: the gate measures what clients would see.
    sk_out = sklearn_outputs(model, inputs.for_sklearn(rows), task)
    onnx_out = np.asarray(onnx_out, dtype=np.float64)
    if task == "regression":
        onnx_out = onnx_out.reshape(-1)
    if onnx_out.shape != sk_out.shape:
        return report(f"output shapes differ: onnx {onnx_out.shape}, sklearn {sk_out.shape}")

    problems: list[str] = []
    mismatches = 0
    if task == "classification":
        mismatch = onnx_out.argmax(axis=1) != sk_out.argmax(axis=1)
        test_mm, random_mm = int(mismatch[:n_test].sum()), int(mismatch[n_test:].sum())
        mismatches = test_mm + random_mm
        if test_mm:
            problems.append(f"{test_mm} class mismatches in {n_test} data rows")
        if random_mm:
            problems.append(f"{random_mm} class mismatches in {n_random} random rows")
    abs_diff = np.abs(onnx_out - sk_out)
    diff = float(np.max(abs_diff)) if abs_diff.size else 0.0
    rel: float | None = None
    if not np.isfinite(diff):
        problems.append(f"onnx {compared} are not finite")
        return report("; ".join(problems), mismatches)
    if task == "classification":
        if diff > tolerance:
            problems.append(
                f"max probability difference {diff:.3g} exceeds tolerance {tolerance:g}"
            )
    else:
        rel = float(np.max(abs_diff / np.maximum(1.0, np.abs(sk_out)))) if abs_diff.size else 0.0
        if rel > tolerance:
            problems.append(
                f"max relative prediction difference {rel:.3g} exceeds tolerance {tolerance:g}"
            )
    return report("; ".join(problems) or None, mismatches, diff, rel)


def export(
    model: Any,
    inputs: ModelInput,
    task: Task,
    specs: list[dict[str, Any]],
    x_test: NDArray[Any],
    *,
    parity_random_rows: int,
    tolerance: float,
) -> OnnxOutcome:
    """Convert and gate; any failure yields an sklearn-only outcome whose reason
    names the step and what serving it natively costs."""
    if inputs.category_dtypes and not _takes_codes(model, inputs):
        columns = ", ".join(inputs.category_dtypes)
        step = model_steps.named_steps(model)[-1][0]
        reason = f"{step}: pandas category columns ({columns}) have no ONNX conversion"
        return skipped(_with_cost(reason, model, inputs, task, x_test, specs), tolerance, task)
    try:
        model_bytes = convert(model, inputs, task)
        info = graph_info(model_bytes, task, len(inputs.features))
    except Exception as exc:
        step = model_steps.failing_step(exc, convertible(model))
        reason = f"{step}: conversion failed: {_one_line(exc)}"
        return skipped(_with_cost(reason, model, inputs, task, x_test, specs), tolerance, task)
    nullable = nullable_features(specs, x_test)
    probes = with_missing_values(random_rows(specs, parity_random_rows), nullable)
    report = check_parity(model_bytes, info, model, inputs, task, x_test, probes, tolerance)
    if not report.passed:
        rows = np.concatenate([x_test, probes]) if len(probes) else x_test
        where = _disagreeing_step(model, inputs, task, rows, tolerance)
        why = _with_cost(
            where + (report.reason or ""), model, inputs, task, x_test, specs, model_bytes, info
        )
        return OnnxOutcome(None, None, dataclasses.replace(report, reason=why))
    return OnnxOutcome(model_bytes, info, report)


def _disagreeing_step(
    model: Any, inputs: ModelInput, task: Task, rows: NDArray[Any], tolerance: float
) -> str:
    """Where the graph parts from scikit-learn, as the reason's prefix. A
    pipeline's final estimator converted alone and fed scikit-learn's own output
    of the steps before it: when that agrees, the steps before it are to blame
    (the graph computes them in float32, scikit-learn in float64, and a tree's
    split can fall between the two); otherwise the final estimator."""
    steps = getattr(model, "steps", None)
    final_name = steps[-1][0] if steps else model_steps.ROOT
    if not steps or len(steps) < 2:
        return f"{final_name}: "
    try:
        before, final = model[:-1], steps[-1][1]
        x = before.transform(inputs.for_sklearn(rows))
        x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
        alone = ModelInput([FeatureInfo(f"x{j}", f"x{j}", None) for j in range(x.shape[1])])
        final_bytes = convert(final, alone, task)
        final_info = graph_info(final_bytes, task, x.shape[1])
        output = final_info.get("probabilities_output") or final_info["prediction_output"]
        (out,) = session(final_bytes).run([output], {final_info["input_name"]: x})
    except Exception:
        return f"{final_name}: "
    expected = sklearn_outputs(model, inputs.for_sklearn(rows), task)
    diff = np.abs(np.asarray(out, dtype=np.float64).reshape(expected.shape) - expected)
    if task == "regression":
        diff = diff / np.maximum(1.0, np.abs(expected))
    if not diff.size or not float(np.max(diff)) <= tolerance:
        return f"{final_name}: "
    before_names = [name for name, _ in steps[:-1]]
    them = "it" if len(before_names) == 1 else "them"
    return (
        f"{', '.join(before_names)}: the graph computes {them} in float32 (scikit-learn "
        f"in float64), and {final_name} amplifies the difference: "
    )


# Share of the random rows' cells left missing in each feature the model takes NaN in.
MISSING_SHARE = 0.2


def nullable_features(specs: list[dict[str, Any]], x_test: NDArray[Any]) -> list[int]:
    """The features a request may leave missing: declared nullable, or missing
    somewhere in the reference rows (the model was shown such rows)."""
    found = []
    for j, spec in enumerate(specs):
        column: Any = x_test[:, j] if len(x_test) else ()
        if spec.get("nullable") or any(is_missing(v) for v in column):
            found.append(j)
    return found


def with_missing_values(rows: NDArray[Any], nullable: list[int]) -> NDArray[Any]:
    """The random rows, with a share of the values missing in every nullable
    feature: the gate compares what a request with a missing field gets."""
    if not len(rows) or not nullable:
        return rows
    rng = np.random.default_rng(PARITY_SEED + 1)
    rows = rows.copy()
    for j in nullable:
        rows[rng.random(len(rows)) < MISSING_SHARE, j] = np.nan
    return rows


# Calls timed per backend for the cost figure of an sklearn-only bundle.
COST_CALLS = 30


def _with_cost(
    reason: str,
    model: Any,
    inputs: ModelInput,
    task: Task,
    x_test: NDArray[Any],
    specs: list[dict[str, Any]],
    model_bytes: bytes | None = None,
    info: dict[str, Any] | None = None,
) -> str:
    """The reason, and what one row costs on each backend (median of in-process
    calls): what falling back to scikit-learn means for latency."""
    from threadpoolctl import threadpool_limits

    row = x_test[:1] if len(x_test) else random_rows(specs, 1)
    try:
        frame = inputs.for_sklearn(row)
        # As the service's sklearn backend runs the model: n_jobs=1 and one
        # OpenMP thread (service/backends/sklearn.py).
        timed = model
        if hasattr(model, "n_jobs"):
            import copy

            timed = copy.deepcopy(model).set_params(n_jobs=1)
        with threadpool_limits(limits=1):
            sklearn_us = _median_us(lambda: sklearn_outputs(timed, frame, task))
        costs = [f"sklearn {sklearn_us:.0f} µs/row"]
    except Exception:
        return reason
    if model_bytes is not None and info is not None:
        output = (
            info["probabilities_output"] if task == "classification" else info["prediction_output"]
        )
        try:
            run, feeds = session(model_bytes).run, inputs.for_onnx(row, info)
            costs.insert(0, f"onnx {_median_us(lambda: run([output], feeds)):.0f} µs/row")
        except Exception:
            costs.insert(0, "onnx unusable")
    else:
        costs.insert(0, "onnx unavailable")
    return f"{reason} ({', '.join(costs)})"


def _median_us(call: Any) -> float:
    import statistics
    import time

    call()
    samples = []
    for _ in range(COST_CALLS):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _one_line(exc: BaseException) -> str:
    # Converter errors can be pages long; the report and stderr want one line.
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
