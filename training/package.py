"""`python -m training package`: turn a model the user already fitted into a bundle.

Everything the manifest needs is read from the estimator (feature names, task,
classes) and from optional reference data (feature kinds, bounds, deciles,
category frequencies, target statistics, scores). The bundle then goes
through the same ONNX conversion, parity gate and validation as a fitted one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.manifest import FEATURE_NAME_PATTERN, FEATURE_NAME_RE, FeatureKind, Task
from training import bundle_writer, features, fit, onnx_export, trust
from training.datasets import Dataset, FeatureInfo, load_csv
from training.errors import TrainingError
from training.native_categories import native_categories
from training.pipeline import Publication, Warn, publish


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
    for n in names:
        if not FEATURE_NAME_RE.match(n):
            raise TrainingError(
                f"feature name {n!r} is not usable as an API field; names must match "
                f"{FEATURE_NAME_PATTERN} (rename it with --features and a matching CSV header)"
            )
    if len(set(names)) != len(names):
        raise TrainingError(f"feature names repeat: {names}")
    return names, fitted is not None


def class_names(model: Any, data: Dataset | None) -> list[str]:
    """Class names in predict_proba column order.

    When the classes are encoded as 0..k-1 and the reference target holds k
    other labels, the labels are mapped in sorted order (LabelEncoder's).
    """
    classes = [str(c) for c in model.classes_]
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
            description=n.replace("_", " ").capitalize(),
            unit=None,
            kind="category" if n in encoded else kinds.get(n, "number"),
        )
        for n in names
    ]


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
        truth: NDArray[Any] = np.asarray(data.target_labels, dtype=object)
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
    encoded = _encoded_categories(model, names)
    native = native_categories(model, names)
    data = _reference(config, task, categorical={*encoded, *native})
    infos = _infos(names, data, header, {*encoded, *native})
    x = _columns_in_order(data, header, names) if data is not None and header else None
    specs = [
        _native_category_spec(info, x[:, j] if x is not None else None, native[info.name])
        if info.name in native
        else features.feature_spec(info, x[:, j])
        if x is not None
        else _unreferenced(info, encoded)
        for j, info in enumerate(infos)
    ]
    category_dtypes = {s["name"]: s["categories"] for s in specs if s.get("native_dtype")}
    classes = class_names(model, data) if task == "classification" else None
    if classes is not None and len(classes) < 2:
        raise TrainingError(f"the classifier knows fewer than 2 classes: {classes}")
    inputs = onnx_export.ModelInput(infos, as_frame=as_frame, category_dtypes=category_dtypes)
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
        parity_rows=x if x is not None else np.empty((0, len(names)), dtype=object),
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


def _unreferenced(info: FeatureInfo, encoded: dict[str, list[str]]) -> dict[str, Any]:
    """A feature spec without reference data: a category's allowed values come
    from the model's own encoder, with no frequencies."""
    if info.kind != "category":
        return features.feature_spec(info, None)
    spec = features.feature_spec(info, np.asarray(encoded[info.name], dtype=object))
    return spec | {"categories": encoded[info.name], "frequencies": None}


def _native_category_spec(
    info: FeatureInfo, column: NDArray[Any] | None, categories: list[str] | None
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
        spec = features.feature_spec(info, column)
        return spec | {"native_dtype": "category"}
    spec = features.feature_spec(info, np.asarray(categories, dtype=object))
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
