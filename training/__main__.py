"""`python -m training`: parse flags, run one training, report in one line either way."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from training.bundle_writer import (
    MANIFEST_FILE,
    MODEL_FILE_SKLEARN,
    MODEL_FILE_SKOPS,
    check_name,
    check_version,
)
from training.datasets import BUILTIN_DATASETS
from training.errors import TrainingError
from training.fit import ESTIMATORS
from training.package import PackageConfig, package
from training.pipeline import TrainConfig, train
from training.pipeline import _stderr_warning as warn_on_stderr

PREFIX = "training: error: "
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Same prefix as runtime failures, so scripts grep for one thing.
        self.print_usage(sys.stderr)
        self.exit(2, f"{PREFIX}{message}\n")


def _checked(convert: Callable[[str], T], ok: Callable[[T], bool], what: str) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


def _via(check: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check(text)
        except TrainingError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
    non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
    open_fraction = _checked(float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")
    closed_fraction = _checked(float, lambda v: 0 <= v <= 1, "a number between 0 and 1")
    non_negative = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")

    p = _Parser(
        prog="python -m training",
        description="Train a classifier or regressor and write a versioned model bundle "
        "(model.joblib, model.onnx, manifest.json) to DIR/<name>/<version>/. "
        "To bundle a model you already have: python -m training package --help",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset", choices=BUILTIN_DATASETS, help="bundled data set (default: iris)"
    )
    source.add_argument("--csv", type=Path, metavar="PATH", help="CSV file with a header row")
    p.add_argument("--target", metavar="COLUMN", help="target column of --csv")
    p.add_argument(
        "--task",
        choices=("classification", "regression"),
        help="default: the data set's (diabetes is regression), else classification",
    )
    p.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="random_forest",
        help="linear: logistic or linear regression after a StandardScaler",
    )
    p.add_argument(
        "--name", type=_via(check_name), help="bundle name (default: data set name or CSV stem)"
    )
    p.add_argument("--version", type=_via(check_version), default="1.0.0", metavar="X.Y.Z")
    p.add_argument("--output-dir", type=Path, default=Path("artifacts"), metavar="DIR")
    p.add_argument("--n-estimators", type=positive_int, default=100, metavar="N")
    p.add_argument("--max-depth", type=positive_int, default=None, metavar="N")
    p.add_argument("--random-state", type=int, default=42, metavar="SEED")
    p.add_argument("--test-size", type=open_fraction, default=0.25, metavar="FRACTION")
    p.add_argument("--min-accuracy", type=closed_fraction, default=0.9, metavar="FRACTION")
    p.add_argument(
        "--min-r2",
        type=_checked(float, math.isfinite, "a finite number"),
        default=0.0,
        metavar="R2",
        help="regression quality gate on the held-out rows",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle version")
    p.add_argument("--parity-random-rows", type=non_negative_int, default=5000, metavar="N")
    p.add_argument(
        "--parity-tolerance",
        type=non_negative,
        default=None,
        metavar="TOL",
        help="max probability difference (default 1e-5), or for regression max relative "
        "prediction difference |onnx - sklearn| / max(1, |sklearn|) (default 1e-4)",
    )
    p.add_argument("--no-onnx", action="store_true", help="write an sklearn-only bundle")
    return p


def config_from(argv: Sequence[str] | None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.csv is not None and not args.target:
        parser.error("--csv requires --target COLUMN")
    if args.target is not None and args.csv is None:
        parser.error("--target is only meaningful with --csv")
    return TrainConfig(
        dataset=args.dataset or "iris",
        csv=args.csv,
        target=args.target,
        task=args.task,
        estimator=args.estimator,
        name=args.name,
        version=args.version,
        output_dir=args.output_dir,
        n_estimators=args.n_estimators,
        max_depth=args.max_depth,
        random_state=args.random_state,
        test_size=args.test_size,
        min_accuracy=args.min_accuracy,
        min_r2=args.min_r2,
        force=args.force,
        parity_random_rows=args.parity_random_rows,
        parity_tolerance=args.parity_tolerance,
        onnx=not args.no_onnx,
    )


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    """'a=1,b c=2' as [('a', '1'), ('b c', '2')]: each item split at its last '='."""
    pairs = []
    for item in text.split(","):
        key, equals, value = item.rpartition("=")
        if not equals or not key.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not {what}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _renames(text: str) -> dict[str, str]:
    return dict(_pairs(text, "NAME=API_NAME"))


def _bound(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _bounds(text: str) -> dict[str, tuple[float | None, float | None]]:
    result = {}
    for name, interval in _pairs(text, "NAME=LOW:HIGH"):
        low, colon, high = interval.partition(":")
        if not colon:
            raise argparse.ArgumentTypeError(f"{name}={interval!r} is not NAME=LOW:HIGH")
        result[name] = (_bound(low), _bound(high))
    return result


def build_package_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m training package",
        description="Turn a model you already fitted (a joblib file of a scikit-learn "
        "estimator or pipeline, XGBoost or LightGBM) into a versioned bundle in "
        "DIR/<name>/<version>/.",
    )
    p.add_argument(
        "model_file",
        type=Path,
        metavar="MODEL_FILE",
        help="a joblib or pickle file (.joblib, .pkl, .pickle), or a .skops file",
    )
    p.add_argument("--name", type=_via(check_name), required=True)
    p.add_argument("--version", type=_via(check_version), required=True, metavar="X.Y.Z")
    p.add_argument(
        "--reference-data",
        type=Path,
        metavar="CSV",
        help="rows like those the model was fitted on (header row): feature kinds, bounds, "
        "deciles, category values; without it drift metrics are off",
    )
    p.add_argument("--target", metavar="COLUMN", help="target column of --reference-data")
    p.add_argument(
        "--features",
        type=lambda text: [n.strip() for n in text.split(",")],
        metavar="a,b,c",
        help="feature names in the model's column order, for a model fitted without names",
    )
    p.add_argument("--output-dir", type=Path, default=Path("artifacts"), metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace an existing bundle version")
    p.add_argument(
        "--parity-random-rows",
        type=_checked(int, lambda v: v >= 0, "an integer >= 0"),
        default=5000,
        metavar="N",
    )
    p.add_argument(
        "--parity-tolerance",
        type=_checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
        default=None,
        metavar="TOL",
    )
    p.add_argument("--no-onnx", action="store_true", help="write an sklearn-only bundle")
    p.add_argument(
        "--nullable",
        type=_comma_list,
        default=[],
        metavar="a,b|all",
        help="features that accept a missing value (JSON null or a left-out field) besides "
        "those missing in --reference-data; the model must answer with them missing",
    )
    p.add_argument(
        "--rename",
        type=_renames,
        default={},
        metavar="'column=field,...'",
        help="API field names for some columns (the model keeps its own)",
    )
    p.add_argument(
        "--bounds",
        type=_bounds,
        default={},
        metavar="'a=0:,b=0:120'",
        help="inclusive limits requests must respect (either side may be open)",
    )
    p.add_argument(
        "--strict-bounds",
        action="store_true",
        help="also refuse values far outside the reference data's range (10 spans around "
        "it; zero or below where every reference value was positive)",
    )
    p.add_argument(
        "--class-names",
        type=_comma_list,
        default=None,
        metavar="a,b",
        help="names of the model's classes, in its class order (for integer-coded classes)",
    )
    p.add_argument(
        "--trusted-digests-file",
        type=Path,
        metavar="PATH",
        help="record the bundle's model.joblib SHA-256 here, the file the service reads as "
        "TRUSTED_DIGESTS_FILE (make package passes secrets/trusted-model-sha256, which "
        "make serve reads): the native model then loads with no digest pinned by hand",
    )
    p.add_argument(
        "--trust-skops-types",
        type=lambda text: tuple(t for t in _comma_list(text) if t),
        default=(),
        metavar="a.B,c.D",
        help="for a .skops MODEL_FILE: the types beyond skops' defaults you trust it to "
        "hold (the packager lists them when it refuses the file)",
    )
    return p


def package_config_from(argv: Sequence[str]) -> PackageConfig:
    args = build_package_parser().parse_args(argv)
    return PackageConfig(
        model_file=args.model_file,
        name=args.name,
        version=args.version,
        reference_data=args.reference_data,
        target=args.target,
        features=args.features,
        output_dir=args.output_dir,
        force=args.force,
        parity_random_rows=args.parity_random_rows,
        parity_tolerance=args.parity_tolerance,
        onnx=not args.no_onnx,
        nullable=args.nullable,
        rename=args.rename,
        bounds=args.bounds,
        strict_bounds=args.strict_bounds,
        class_names=args.class_names,
        trusted_digests_file=args.trusted_digests_file,
        trust_skops_types=args.trust_skops_types,
    )


def summary(manifest: dict[str, Any]) -> str:
    metrics, parity = manifest["metrics"], manifest["parity"]
    scores = "no reference target"
    if metrics is not None and manifest["task"] == "classification":
        scores = f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f}"
    elif metrics is not None:
        scores = (
            f"R² {metrics['r2']:.4f}, MAE {metrics['mean_absolute_error']:.4g}, "
            f"RMSE {metrics['root_mean_squared_error']:.4g}"
        )
    return (
        f"{manifest['name']} {manifest['version']} ({manifest['task']}): {scores}, "
        f"backend {manifest['backend']}, {parity_outcome(parity)}"
    )


def parity_outcome(parity: dict[str, Any]) -> str:
    """What the gate found, and never a result it did not reach: a model that
    did not convert (or --no-onnx) was never compared."""
    if parity["passed"]:
        return "parity passed"
    if parity["test_rows"] + parity["random_rows"] == 0:
        return "parity not run"
    return "parity failed"


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    run: Callable[[], Path]
    digests_file: Path | None = None
    if arguments[:1] == ["package"]:
        package_config = package_config_from(arguments[1:])
        digests_file = package_config.trusted_digests_file
        run = lambda: package(package_config, warn_on_stderr)  # noqa: E731
    else:
        config = config_from(arguments)
        run = lambda: train(config)  # noqa: E731
    try:
        path = run()
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except TrainingError as exc:
        print(PREFIX + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(PREFIX + "interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A bug, but the contract is still one line and exit 1; rerun with
        # python -X dev or a debugger for the traceback.
        message = " ".join(str(exc).split())
        print(f"{PREFIX}unexpected {type(exc).__name__}: {message}", file=sys.stderr)
        return 1
    print(summary(manifest))
    if manifest.get("skops_trusted_types") is not None:
        print(f"trusted: {MODEL_FILE_SKOPS} loads with skops' safe loader; nothing to pin")
    elif digests_file is not None:
        digest = manifest["files"][MODEL_FILE_SKLEARN]["sha256"]
        print(
            f"trusted: {MODEL_FILE_SKLEARN} sha256 {digest} recorded in {digests_file} "
            "(TRUSTED_DIGESTS_FILE, which make serve reads)"
        )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
