"""`python -m training package`: turn a model the user already fitted into a bundle.

Everything the manifest needs is read from the estimator (feature names, task,
classes) and from optional reference data (feature kinds, bounds, deciles,
category frequencies, target statistics, scores). The bundle then goes
through the same ONNX conversion, parity gate and validation as a fitted one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.manifest import FEATURE_NAME_RE, MAX_FEATURE_NAME_LENGTH, FeatureKind, Task
from training import bundle_writer, features, fit, onnx_export, trust
from training.datasets import Dataset, FeatureInfo, load_csv
from training.errors import TrainingError
from training.native_categories import native_categories
from training.pipeline import Publication, Warn, publish

# Reference rows each nullable feature is proven on, missing.
NULLABLE_PROOF_ROWS = 50
# Parity rows drawn at random with each nullable feature missing half the time
# (never more than --parity-random-rows, so 0 turns them off too).
MISSING_PARITY_ROWS = 1000
MISSING_PARITY_SEED = 20260412
# A declared bound: (lower, upper), inclusive; None where open.
Bound = tuple[float | None, float | None]


@dataclass(frozen=True)
class PackageConfig:
    model_file: Path
    name: str
    version: str
    reference_data: Path | None = None
    target: str | None = None
    features: Sequence[str] | None = None
    output_dir: Path = Path("artifacts")
    force: bool = False
    parity_random_rows: int = 5000
    parity_tolerance: float | None = None
    onnx: bool = True
    # Features that take a missing value besides those missing in the reference
    # data; "all" (alone) for every feature.
    nullable: Sequence[str] = ()
    # The model's column name -> the API's field name.
    rename: Mapping[str, str] = field(default_factory=dict)
    bounds: Mapping[str, Bound] = field(default_factory=dict)
    # Today's wide plausibility range around the reference data refuses again.
    strict_bounds: bool = False
    # Names of integer-coded classes, in the model's class order.
    class_names: Sequence[str] | None = None
    # Where the service reads trusted digests (make serve's TRUSTED_DIGESTS_FILE):
    # the bundle's model.joblib digest is recorded there. None: not recorded.
    trusted_digests_file: Path | None = None
    # --trust-skops-types: what the user confirmed a .skops file may hold.
    trust_skops_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedModel:
    estimator: Any
    # Set for a .skops file: the types beyond skops' defaults it needs, confirmed.
    skops_trusted_types: list[str] | None = None


SKOPS_SUFFIX = ".skops"


def load_model(path: Path, trust_skops_types: Collection[str] = ()) -> LoadedModel:
    """A .skops file through skops' safe loader, with the types its user confirmed;
    anything else (.joblib, .pkl, .pickle) unpickled: the user's own file, trusted
    by the person running this command."""
    if not path.is_file():
        raise TrainingError(f"cannot read {path}: no such file")
    skops_types = None
    try:
        if path.suffix == SKOPS_SUFFIX:
            skops_types = _skops_types(path, trust_skops_types)
            import skops.io

            model = skops.io.load(path, trusted=skops_types)
        else:
            import joblib

            model = joblib.load(path)
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(f"cannot load {path}: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(model, "predict", None)):
        raise TrainingError(f"{path} holds a {type(model).__name__}, not a fitted estimator")
    return LoadedModel(model, skops_types)


def _skops_types(path: Path, confirmed: Collection[str]) -> list[str]:
    """The types the file needs beyond skops' defaults, once all are confirmed."""
    try:
        import skops.io
    except ImportError:
        raise TrainingError(
            f"{path} is a skops file and skops is not installed (pip install skops)"
        ) from None
    needed = sorted(skops.io.get_untrusted_types(file=path))
    unconfirmed = [t for t in needed if t not in set(confirmed)]
    if unconfirmed:
        flag = f"--trust-skops-types {','.join(needed)}"
        raise TrainingError(
            f"{path} needs types skops does not trust by default: {', '.join(unconfirmed)}; "
            f"if you trust them, pass {flag} (make package PACKAGE_ARGS='{flag}')"
        )
    return needed


def task_of(model: Any) -> Task:
    from sklearn.base import is_classifier, is_regressor

    if is_classifier(model):
        if not callable(getattr(model, "predict_proba", None)):
            raise TrainingError(
                f"{type(model).__name__} has no predict_proba; the API answers with probabilities"
            )
        return "classification"
    if is_regressor(model):
        return "regression"
    raise TrainingError(f"{type(model).__name__} is neither a classifier nor a regressor")


def _differ(a: Sequence[str], b: Sequence[str]) -> str:
    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    if not only_a and not only_b:
        return "same names in another order"
    return f"only in the first: {only_a}; only in the second: {only_b}"


def resolve_feature_names(
    model: Any, given: Sequence[str] | None, header: Sequence[str] | None
) -> tuple[list[str], bool]:
    """Names and order: feature_names_in_, else --features, else the CSV header.

    Returns the names and whether the estimator was fitted on a DataFrame.
    """
    fitted = getattr(model, "feature_names_in_", None)
    n_in = getattr(model, "n_features_in_", None)
    sources: list[tuple[str, list[str]]] = []
    if fitted is not None:
        sources.append(("the model's feature_names_in_", [str(n) for n in fitted]))
    if given is not None:
        sources.append(("--features", list(given)))
    if header is not None:
        sources.append(("the reference data's columns", list(header)))
    if not sources:
        raise TrainingError(
            "the model does not record its feature names: pass --features a,b,c "
            "or --reference-data with a header row"
        )
    chosen_from, names = sources[0]
    for source, other in sources[1:]:
        if other != names:
            raise TrainingError(
                f"feature names from {chosen_from} and {source} differ ({_differ(names, other)})"
            )
    if n_in is not None and len(names) != int(n_in):
        raise TrainingError(
            f"the model takes {n_in} features but {chosen_from} names {len(names)}: {names}"
        )
    return names, fitted is not None


def api_names(names: Sequence[str], rename: Mapping[str, str]) -> list[str]:
    """Each feature's JSON field name: its own, or what --rename gives it. Every
    unusable name is listed in one error, so one fix settles them all."""
    problems = [f"--rename names {old!r}, not a feature" for old in rename if old not in names]
    fields = [rename.get(n, n) for n in names]
    for name, api in zip(names, fields, strict=True):
        shown = repr(api) if api == name else f"{api!r} (renamed from {name!r})"
        if not api.strip():
            problems.append(f"{shown} is empty")
        elif len(api) > MAX_FEATURE_NAME_LENGTH:
            problems.append(f"{shown[:60]}... is longer than {MAX_FEATURE_NAME_LENGTH} characters")
        elif not FEATURE_NAME_RE.match(api):
            problems.append(f"{shown} holds a control character")
    repeated = sorted({api for api in fields if fields.count(api) > 1})
    problems += [f"{api!r} names more than one feature" for api in repeated]
    if problems:
        raise TrainingError(
            f"unusable feature names ({len(problems)}): "
            + "; ".join(problems)
            + " (give API names with --rename 'old=new,...')"
        )
    return fields


def nullable_features(
    names: Sequence[str], requested: Sequence[str], data_missing: Collection[str]
) -> set[str]:
    """Features missing in the reference data, and those --nullable names."""
    if list(requested) == ["all"]:
        return set(names)
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise TrainingError(f"--nullable names unknown features {unknown}; the features: {names}")
    return set(requested) | set(data_missing)


def declared_bounds(infos: Sequence[FeatureInfo], bounds: Mapping[str, Bound]) -> list[FeatureInfo]:
    kinds = {info.name: info.kind for info in infos}
    problems = [f"{n!r} is not a feature" for n in bounds if n not in kinds]
    problems += [f"{n!r} is a category" for n in bounds if kinds.get(n) == "category"]
    problems += [
        f"{n!r}: {lo} is above {hi}"
        for n, (lo, hi) in bounds.items()
        if lo is not None and hi is not None and lo > hi
    ]
    if problems:
        raise TrainingError("--bounds: " + "; ".join(problems))
    result = []
    for info in infos:
        lo, hi = bounds.get(info.name, (None, None))
        declared = {"minimum": lo, "maximum": hi}
        kept = {key: value for key, value in declared.items() if value is not None}
        result.append(replace(info, declared_bounds=kept) if kept else info)
    return result


def class_names(model: Any, data: Dataset | None, given: Sequence[str] | None = None) -> list[str]:
    """Class names in predict_proba column order.

    --class-names names them in that order. When the classes are encoded as
    0..k-1 and the reference target holds k other labels, the labels are
    mapped in sorted order (LabelEncoder's).
    """
    classes = [str(c) for c in model.classes_]
    if given is not None:
        if len(given) != len(classes):
            raise TrainingError(
                f"--class-names gives {len(given)} names for the model's {len(classes)} "
                f"classes {classes[:10]}"
            )
        if len(set(given)) != len(given) or not all(given):
            raise TrainingError(f"--class-names must be distinct and non-empty: {list(given)}")
        return list(given)
    labels = sorted(set(data.target_labels)) if data and data.target_labels else None
    if labels is None or set(labels) <= set(classes):
        return classes
    if classes == [str(i) for i in range(len(classes))] and len(labels) == len(classes):
        return labels
    raise TrainingError(
        f"the reference target's values {labels[:10]} are not the model's classes {classes[:10]}"
    )


def _reference(config: PackageConfig, task: Task, categorical: Collection[str]) -> Dataset | None:
    if config.reference_data is None:
        if config.target is not None:
            raise TrainingError("--target is only meaningful with --reference-data")
        return None
    return load_csv(config.reference_data, config.target, task, typed=True, categorical=categorical)


def _reference_header(config: PackageConfig) -> list[str] | None:
    """Feature columns as written: packaging keeps names as they are, since the
    model may select its columns by them."""
    if config.reference_data is None:
        return None
    header = _raw_header(config.reference_data)
    if config.target is not None and config.target not in header:
        raise TrainingError(
            f"target column {config.target!r} is not in the header of "
            f"{config.reference_data}: {header}"
        )
    return [c for c in header if c != config.target]


def _encoded_categories(model: Any, names: list[str]) -> dict[str, list[str]]:
    """String columns a OneHotEncoder or OrdinalEncoder inside a ColumnTransformer knows."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

    found: dict[str, list[str]] = {}
    for step in onnx_export._steps(model):
        if not isinstance(step, ColumnTransformer):
            continue
        for _, transformer, columns in getattr(step, "transformers_", []):
            encoder = onnx_export._steps(transformer)[-1]
            if not isinstance(encoder, OneHotEncoder | OrdinalEncoder):
                continue
            selected = [names[c] if isinstance(c, int | np.integer) else str(c) for c in columns]
            for column, values in zip(selected, encoder.categories_, strict=False):
                if values.dtype == object:
                    # NaN among them is a missing value the encoder saw, not a category.
                    found[column] = [str(v) for v in values if not onnx_export.is_missing(v)]
    return found


def _infos(
    names: list[str],
    data: Dataset | None,
    header: list[str] | None,
    encoded: Collection[str],
) -> list[FeatureInfo]:
    kinds: dict[str, FeatureKind] = {}
    if data is not None and header is not None:
        kinds = {column: f.kind for column, f in zip(header, data.features, strict=True)}
    return [
        FeatureInfo(
            name=n,
            description=n.replace("_", " ").capitalize() if n.strip() else n,
            unit=None,
            kind="category" if n in encoded else kinds.get(n, "number"),
        )
        for n in names
    ]


def _with_missing(x: NDArray[Any], column: int) -> NDArray[Any]:
    rows = x.astype(object) if x.dtype != object else x.copy()
    rows[:, column] = np.nan
    return rows if x.dtype == object else rows.astype(np.float64)


def prove_nullable(
    model: Any,
    task: Task,
    inputs: onnx_export.ModelInput,
    rows: NDArray[Any],
    nullable: Collection[str],
) -> None:
    """The model answers (finitely) with each nullable feature missing, or the
    bundle is refused with the model's own error."""
    for j, info in enumerate(inputs.features):
        if info.name not in nullable:
            continue
        try:
            outputs = onnx_export.sklearn_outputs(
                model, inputs.for_sklearn(_with_missing(rows, j)), task
            )
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            raise TrainingError(
                f"feature {info.name!r} is nullable but the model fails on a missing value: "
                f"{type(exc).__name__}: {message}"
            ) from None
        if not np.all(np.isfinite(outputs)):
            raise TrainingError(
                f"feature {info.name!r} is nullable but the model answers NaN or infinity "
                "when it is missing"
            )


def missing_parity_rows(
    specs: list[dict[str, Any]], nullable: Collection[str], n: int
) -> NDArray[Any]:
    """Random rows inside the features' ranges, each nullable feature missing at
    random (half the rows): the parity gate's rows with missing values."""
    columns = [j for j, spec in enumerate(specs) if spec["name"] in nullable]
    if not columns or n == 0:
        return np.empty((0, len(specs)), dtype=object)
    rows = onnx_export.random_rows(specs, n).astype(object)
    rng = np.random.default_rng(MISSING_PARITY_SEED)
    for j in columns:
        rows[rng.random(n) < 0.5, j] = np.nan
    return rows


def _columns_in_order(data: Dataset, header: list[str], names: list[str]) -> NDArray[Any]:
    index = {column: j for j, column in enumerate(header)}
    return data.X[:, [index[n] for n in names]]


@dataclass(frozen=True)
class _Evaluation:
    metrics: dict[str, Any] | None
    target_statistics: dict[str, Any] | None


def _evaluate(
    model: Any,
    task: Task,
    data: Dataset | None,
    x: NDArray[Any] | None,
    inputs: onnx_export.ModelInput,
    classes: list[str] | None,
) -> _Evaluation:
    """Run the model on the reference rows (a model that fails on them is refused)
    and score it where the reference data has the target."""
    if x is None or data is None:
        return _Evaluation(None, None)
    try:
        outputs = onnx_export.sklearn_outputs(model, inputs.for_sklearn(x), task)
    except Exception as exc:
        raise TrainingError(
            f"the model fails on the reference data: {type(exc).__name__}: {exc}"
        ) from None
    if data.y is None:
        return _Evaluation(None, None)
    target_statistics = None
    if task == "classification":
        assert classes is not None
        # A target written as the model's own classes reads as their names
        # (--class-names); one written as the names already is left alone.
        named = dict(zip((str(c) for c in model.classes_), classes, strict=True))
        labels = data.target_labels or []
        if not set(labels) <= set(classes):
            labels = [named.get(label, label) for label in labels]
        truth: NDArray[Any] = np.asarray(labels, dtype=object)
        predicted = np.asarray(classes, dtype=object)[outputs.argmax(axis=1)]
    else:
        truth, predicted = data.y, outputs
        target_statistics = features.target_statistics(np.asarray(data.y, dtype=np.float64))
    metrics = {
        "evaluated_on": "reference",
        "n_rows": len(truth),
        **fit.score(model, x, truth, task, y_pred=predicted),
    }
    return _Evaluation(metrics, target_statistics)


def package(config: PackageConfig, warn: Warn) -> Path:
    bundle_writer.check_version(config.version)
    name = bundle_writer.check_name(config.name)
    target = bundle_writer.bundle_path(config.output_dir, name, config.version)
    bundle_writer.refuse_existing(target, config.force)
    if config.trusted_digests_file is not None:
        trust.check_outside(config.trusted_digests_file, config.output_dir)

    loaded = load_model(config.model_file, config.trust_skops_types)
    model = loaded.estimator
    task = task_of(model)
    header = _reference_header(config)
    names, as_frame = resolve_feature_names(model, config.features, header)
    fields = api_names(names, config.rename)
    encoded = _encoded_categories(model, names)
    native = native_categories(model, names)
    data = _reference(config, task, categorical={*encoded, *native})
    infos = declared_bounds(_infos(names, data, header, {*encoded, *native}), config.bounds)
    x = _columns_in_order(data, header, names) if data is not None and header else None
    data_missing = (
        [n for j, n in enumerate(names) if features.absent(x[:, j]).any()] if x is not None else []
    )
    nullable = nullable_features(names, config.nullable, data_missing)
    policy: features.BoundsPolicy = "plausible" if config.strict_bounds else "declared"
    specs = [
        (
            _native_category_spec(
                info, x[:, j] if x is not None else None, native[info.name], info.name in nullable
            )
            if info.name in native
            else features.feature_spec(info, x[:, j], policy, info.name in nullable)
            if x is not None
            else _unreferenced(info, encoded, info.name in nullable)
        )
        | ({"api_name": api} if api != info.name else {})
        for j, (info, api) in enumerate(zip(infos, fields, strict=True))
    ]
    category_dtypes = {s["name"]: s["categories"] for s in specs if s.get("native_dtype")}
    classes = class_names(model, data, config.class_names) if task == "classification" else None
    if classes is not None and len(classes) < 2:
        raise TrainingError(f"the classifier knows fewer than 2 classes: {classes}")
    inputs = onnx_export.ModelInput(infos, as_frame=as_frame, category_dtypes=category_dtypes)
    # Before the reference rows are scored: a model that cannot take a missing
    # value is told so by feature, not by the first row that has one.
    proof_rows = x[:NULLABLE_PROOF_ROWS] if x is not None else onnx_export.random_rows(specs, 20)
    prove_nullable(model, task, inputs, proof_rows, nullable)
    evaluation = _evaluate(model, task, data, x, inputs, classes)
    bundle = Publication(
        name=name,
        version=config.version,
        output_dir=config.output_dir,
        force=config.force,
        model=model,
        task=task,
        inputs=inputs,
        data=data,
        specs=specs,
        classes=classes,
        target_statistics=evaluation.target_statistics,
        metrics=evaluation.metrics,
        parity_rows=_parity_rows(x, specs, nullable, config.parity_random_rows),
        reference_rows=x,
        skops_trusted_types=loaded.skops_trusted_types,
    )
    path = publish(
        bundle,
        onnx=config.onnx,
        parity_random_rows=config.parity_random_rows,
        tolerance=config.parity_tolerance,
        warn=warn,
    )
    if config.trusted_digests_file is not None and loaded.skops_trusted_types is None:
        trust.record_digest(path, config.trusted_digests_file)
    return path


def _parity_rows(
    x: NDArray[Any] | None, specs: list[dict[str, Any]], nullable: Collection[str], random_rows: int
) -> NDArray[Any]:
    """The reference rows as they are, then random rows with missing values."""
    rows = x if x is not None else np.empty((0, len(specs)), dtype=object)
    with_missing = missing_parity_rows(specs, nullable, min(MISSING_PARITY_ROWS, random_rows))
    if not len(with_missing):
        return rows
    return np.concatenate([rows.astype(object), with_missing])


def _unreferenced(
    info: FeatureInfo, encoded: dict[str, list[str]], nullable: bool
) -> dict[str, Any]:
    """A feature spec without reference data: a category's allowed values come
    from the model's own encoder, with no frequencies."""
    if info.kind != "category":
        return features.feature_spec(info, None, nullable=nullable)
    spec = features.feature_spec(
        info, np.asarray(encoded[info.name], dtype=object), nullable=nullable
    )
    return spec | {"categories": encoded[info.name], "frequencies": None, "missing_rate": None}


def _native_category_spec(
    info: FeatureInfo, column: NDArray[Any] | None, categories: list[str] | None, nullable: bool
) -> dict[str, Any]:
    """A column the model takes as pandas `category` dtype: its allowed values are
    the model's own categories (or, where the model does not say, the reference
    data's), with the reference data's share of each."""
    if categories is None:
        if column is None:
            raise TrainingError(
                f"the model takes {info.name!r} as a pandas category but does not record "
                "its categories (XGBoost without pyarrow): pass --reference-data"
            )
        spec = features.feature_spec(info, column, nullable=nullable)
        return spec | {"native_dtype": "category"}
    spec = features.feature_spec(info, np.asarray(categories, dtype=object), nullable=nullable)
    spec |= {"categories": categories, "frequencies": None, "native_dtype": "category"}
    if column is None:
        return spec
    values = [str(v) for v in column if not onnx_export.is_missing(v)]
    unknown = sorted(set(values) - set(categories))
    if unknown:
        raise TrainingError(
            f"column {info.name!r} of the reference data has values the model does not "
            f"know as categories: {unknown[:10]} (the model knows {categories[:10]})"
        )
    if values:
        counts = Counter(values)
        spec["frequencies"] = [counts[c] / len(values) for c in categories]
    if len(column):
        spec["missing_rate"] = 1 - len(values) / len(column)
    return spec


def _raw_header(path: Path) -> list[str]:
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            for row in csv.reader(handle):
                if any(c.strip() for c in row):
                    return [c.strip() for c in row]
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TrainingError(f"{path} is not a readable UTF-8 CSV file: {exc}") from None
    raise TrainingError(f"{path} is empty; a header row is required")
