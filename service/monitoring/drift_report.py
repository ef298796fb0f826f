"""`make drift-report`: captured payloads against the reference data, feature by feature.

Reads the CloudEvents lines payload capture writes (service.capture; every
`*.jsonl` under the directory), takes the inputs as the model saw them, and
compares each feature with the same column of the reference CSV the model was
packaged with, using Evidently's data drift preset (each column's test picked
by its type and the number of rows). Writes the HTML report and prints one
line per feature on stdout.

Runs in its own virtualenv (the `monitoring` extra, .tools/monitoring), never
in a worker or an image: nothing here is imported by the service.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

EVENT_TYPE = "ml-api.prediction"


class ReportError(Exception):
    """What the user must fix, said in one line."""


@dataclass(frozen=True)
class Payloads:
    inputs: pd.DataFrame
    files: int
    unreadable_lines: int


def read_payloads(directory: Path, model: str | None = None) -> Payloads:
    """The inputs of every captured event, in the order the files name them."""
    if not directory.is_dir():
        raise ReportError(f"PAYLOADS {directory} is not a directory")
    rows: list[dict[str, Any]] = []
    files = sorted(directory.rglob("*.jsonl"))
    unreadable = 0
    for path in files:
        for line in path.read_bytes().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                unreadable += 1  # a line a shipper cut, or not ours
                continue
            data = event.get("data") if isinstance(event, dict) else None
            if event.get("type") != EVENT_TYPE or not isinstance(data, dict):
                continue
            if model is not None and data.get("model", {}).get("name") != model:
                continue
            rows.append(data["inputs"])
    if not rows:
        raise ReportError(f"no {EVENT_TYPE} events in {len(files)} .jsonl files under {directory}")
    return Payloads(pd.DataFrame.from_records(rows), len(files), unreadable)


def read_reference(path: Path, features: list[str]) -> pd.DataFrame:
    reference = pd.read_csv(path)
    missing = [name for name in features if name not in reference.columns]
    if missing:
        raise ReportError(f"REFERENCE_DATA {path} has no column {', '.join(missing)}")
    return reference[features]


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    method: str
    value: float
    threshold: float

    @property
    def drifted(self) -> bool:
        # Evidently's tests report a p-value (drift below the threshold) or a
        # distance (drift at or above it).
        if "p_value" in self.method:
            return self.value < self.threshold
        return self.value >= self.threshold

    def line(self) -> str:
        verdict = "DRIFT" if self.drifted else "ok"
        return (
            f"{self.feature}: {verdict} ({self.method} {self.value:.4g}, "
            f"threshold {self.threshold:g})"
        )


def _aligned(current: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both sides with the same column types: a feature the reference holds as
    text (a category) is text in the payloads too; null stays missing."""
    current = current.copy()
    for name in current.columns:
        if not pd.api.types.is_numeric_dtype(reference[name]):
            reference = reference.assign(**{name: reference[name].astype("string")})
            current[name] = current[name].astype("string")
        else:
            current[name] = pd.to_numeric(current[name])
    return current, reference


def drift_report(
    current: pd.DataFrame, reference: pd.DataFrame, output: Path
) -> list[FeatureDrift]:
    """Write the HTML report; the drift of each feature, in the payloads' column order."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    current, reference = _aligned(current, reference)
    numeric = [c for c in current.columns if pd.api.types.is_numeric_dtype(reference[c])]
    definition = DataDefinition(
        numerical_columns=numeric,
        categorical_columns=[c for c in current.columns if c not in numeric],
    )
    snapshot = Report([DataDriftPreset()]).run(
        current_data=Dataset.from_pandas(current, data_definition=definition),
        reference_data=Dataset.from_pandas(reference, data_definition=definition),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(output))
    by_feature: dict[str, FeatureDrift] = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith(":ValueDrift"):
            by_feature[config["column"]] = FeatureDrift(
                config["column"], config["method"], float(metric["value"]), config["threshold"]
            )
    return [by_feature[name] for name in current.columns if name in by_feature]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--reference", type=Path, required=True, help="the reference CSV")
    parser.add_argument("--payloads", type=Path, required=True, help="PAYLOAD_LOG_DIR's files")
    parser.add_argument("--output", type=Path, default=Path("drift-report.html"))
    parser.add_argument("--model", help="only this model's events (default: every event)")
    args = parser.parse_args(argv)
    try:
        payloads = read_payloads(args.payloads, args.model)
        features = list(payloads.inputs.columns)
        reference = read_reference(args.reference, features)
        drifts = drift_report(payloads.inputs, reference, args.output)
    except (ReportError, OSError) as exc:
        print(f"drift report: {exc}", file=sys.stderr)
        return 2
    for drift in drifts:
        print(drift.line())
    unreadable = f", {payloads.unreadable_lines} unreadable lines skipped"
    print(
        f"{len(payloads.inputs)} captured rows from {payloads.files} files against "
        f"{len(reference)} reference rows"
        f"{unreadable if payloads.unreadable_lines else ''}; report: {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
