"""Drift rules for Prometheus, generated from a bundle's manifest.

    python -m service.monitoring.rules --model-dir artifacts --model-name iris --output rules.yml

The population stability index of each feature (and of the prediction) is
computed by recording rules over the counters the workers already export, so
the request path pays nothing for it:

- numeric features (and a regressor's prediction): the live histogram is
  bucketed at the reference deciles; a bin's rows over a window are
  increase(bucket{le=upper}) - increase(bucket{le=lower});
- categories (and a classifier's prediction): a counter per value.

Each bin's live share is compared with the share of reference rows the
manifest records for it, both floored at SHARE_FLOOR so an empty bin counts as
a large but finite difference:

    PSI = sum over bins of (live - reference) * ln(live / reference)

Series (label `bin` = the bucket's upper edge, the category or the class):
  ml_api:feature_bin_share:<window>{model, version, feature, bin}
  ml_api:feature_reference_share{model, version, feature, bin}
  ml_api:feature_rows:<window>{model, version, feature}
  ml_api:feature_psi:<window>{model, version, feature}
and the same with `prediction` in place of `feature` (no feature label).

A new kind of comparison is one more Distribution
(service.monitoring.distributions) with its bins: the share, PSI and alert rules
are written for any distribution the same way.

Beside the PSI, each scored feature's missing and out-of-range rates:
  ml_api:feature_missing_rows:<window>{model, version, feature}
  ml_api:feature_missing_rate:<window>        missing / (missing + present) rows
  ml_api:feature_reference_missing_rate       the manifest's missing_rate
  ml_api:feature_out_of_range_rate:<window>   outside the reference min/max / present rows
A feature that is not nullable has a missing rate of 0: a request without it is
rejected (422) before the model sees it, so the worker exports no counter for it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.bundle import BundleError, resolve_bundle_dir
from service.manifest import MANIFEST_FILE, CategoryFeature, Manifest
from service.metrics.instruments import (
    CATEGORY_METRIC,
    FEATURE_METRIC,
    MISSING_METRIC,
    OUT_OF_RANGE_METRIC,
    PREDICTION_VALUE_METRIC,
    PREDICTIONS_METRIC,
)
from service.monitoring.distributions import INF, Distribution, Warn, distributions
from service.monitoring.rule_file import prometheus_rule, render

WINDOWS = ("1h", "24h")
# An empty bin is scored as if it held 0.01% of the rows: finite, and still
# ~0.7 of PSI against a bin expected at 10%.
SHARE_FLOOR = 0.0001
DRIFT_THRESHOLD = 0.2
DEFAULT_FOR = "15m"
# Below this many rows in the hour a PSI is mostly sampling noise (with ten
# bins, about 10 / rows on identical data).
DEFAULT_MIN_ROWS = 500
# MlApiMissingRateJump: the hour's missing rate above the reference by this much
# (absolute) and by this factor, so neither a rare nor a common gap alerts on noise.
MISSING_RATE_JUMP = 0.1
MISSING_RATE_FACTOR = 2

Rule = dict[str, Any]


# --- PromQL -----------------------------------------------------------------------


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _selector(metric: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f"{name}={_quote(value)}" for name, value in labels.items())
    return f"{metric}{{{inner}}}"


@dataclass(frozen=True)
class _Family:
    """Where the live counts of one family (feature or prediction) come from."""

    name: str
    keys: tuple[str, ...]  # the labels that identify one distribution
    histogram: str
    counter: str
    counter_label: str  # the counter's label that names the bin

    def series(self, what: str, window: str | None = None) -> str:
        return f"ml_api:{self.name}_{what}" + (f":{window}" if window else "")


FAMILIES = (
    _Family(
        "feature",
        ("model", "version", "feature"),
        f"{FEATURE_METRIC}_bucket",
        CATEGORY_METRIC,
        "value",
    ),
    _Family(
        "prediction",
        ("model", "version"),
        f"{PREDICTION_VALUE_METRIC}_bucket",
        PREDICTIONS_METRIC,
        "class",
    ),
)


FAMILY = {family.name: family for family in FAMILIES}


def _by(keys: Sequence[str]) -> str:
    return ", ".join(keys)


def _histogram_share_expr(
    distribution: Distribution, family: _Family, labels: dict[str, str], window: str
) -> str:
    """Each bin's share, one series per bin: bucket(upper) - bucket(lower) over the total.
    Written per distribution because the order of the `le` edges is numeric."""

    def rows_at(upper: str) -> str:
        return _selector(family.series("bucket_rows", window), {**labels, "le": upper})

    # `> 0`: a window without rows has no share rather than NaN.
    total = f"({rows_at(INF)} > 0)"
    parts = []
    lower: str | None = None
    for b in distribution.bins:
        rows = rows_at(b.label)
        if lower is not None:
            rows = f"({rows} - ignoring (le) {rows_at(lower)})"
        share = f"{rows} / ignoring (le) {total}"
        parts.append(f'label_replace({share}, "bin", {_quote(b.label)}, "", "")')
        lower = b.label
    return "\n  or\n".join(parts)


def _rows_rules(
    family: _Family, identity: dict[str, str], window: str, kinds: set[bool]
) -> list[Rule]:
    """Rows over the window, summed over instances (one scrape already adds up an
    instance's workers): cumulative per bucket edge from histograms, per bin from
    counters (their value or class label copied to `bin`), and in total."""
    by = _by(family.keys)
    rules: list[Rule] = []
    totals: list[str] = []
    if True in kinds:
        per_edge = family.series("bucket_rows", window)
        source = _selector(family.histogram, identity)
        rules.append(
            {"record": per_edge, "expr": f"sum by ({by}, le) (increase({source}[{window}]))"}
        )
        totals.append(f"sum without (le) ({_selector(per_edge, {**identity, 'le': INF})})")
    if False in kinds:
        per_bin = family.series("bin_rows", window)
        label = family.counter_label
        source = _selector(family.counter, identity)
        per_value = f"sum by ({by}, {label}) (increase({source}[{window}]))"
        as_bin = f'label_replace({per_value}, "bin", "$1", {_quote(label)}, "(.*)")'
        rules.append({"record": per_bin, "expr": f"sum without ({label}) ({as_bin})"})
        totals.append(f"sum without (bin) ({_selector(per_bin, identity)})")
    rules.append({"record": family.series("rows", window), "expr": "\n  or\n".join(totals)})
    return rules


def _counter_share_expr(family: _Family, identity: dict[str, str], window: str) -> str:
    """Each counted bin's share: one expression for every distribution of the family."""
    per_bin = _selector(family.series("bin_rows", window), identity)
    total = _selector(family.series("rows", window), identity)
    return f"{per_bin}\n  / on ({_by(family.keys)}) group_left ()\n({total} > 0)"


def _reference_share_expr(distribution: Distribution) -> str:
    return "\n  or\n".join(
        f"label_replace(vector({max(b.reference, SHARE_FLOOR)!r}), "
        f'"bin", {_quote(b.label)}, "", "")'
        for b in distribution.bins
    )


def _psi_expr(family: _Family, identity: dict[str, str], window: str) -> str:
    live = f"clamp_min({_selector(family.series('bin_share', window), identity)}, {SHARE_FLOOR})"
    reference = _selector(family.series("reference_share"), identity)
    on = f"on ({_by((*family.keys, 'bin'))})"
    return (
        f"sum by ({_by(family.keys)}) (\n"
        f"    ({live} - {on} {reference})\n"
        f"  * ln({live} / {on} {reference})\n"
        ")"
    )


def _labels(manifest: Manifest, distribution: Distribution | None = None) -> dict[str, str]:
    labels = {"model": manifest.name, "version": manifest.version}
    if distribution is not None and distribution.feature is not None:
        labels["feature"] = distribution.feature
    return labels


def _window_rules(manifest: Manifest, found: list[Distribution], window: str) -> list[Rule]:
    identity = _labels(manifest)
    rules: list[Rule] = []
    for family in FAMILIES:
        members = [d for d in found if d.family == family.name]
        if not members:
            continue
        kinds = {d.cumulative for d in members}
        rules += _rows_rules(family, identity, window, kinds)
        share = family.series("bin_share", window)
        if False in kinds:
            rules.append({"record": share, "expr": _counter_share_expr(family, identity, window)})
        rules += [
            {
                "record": share,
                "expr": _histogram_share_expr(d, family, _labels(manifest, d), window),
                # Tells the rules apart for promtool's duplicate check; the series carry it anyway.
                **({"labels": {"feature": d.feature}} if d.feature else {}),
            }
            for d in members
            if d.cumulative
        ]
        rules.append(
            {"record": family.series("psi", window), "expr": _psi_expr(family, identity, window)}
        )
        if family.name == "feature":
            rules += _rate_rules(manifest, window)
    return rules


def _rate_rules(manifest: Manifest, window: str) -> list[Rule]:
    """Each scored feature's missing and out-of-range rates over the window, over the
    rows its PSI counts (ml_api:feature_rows: present values only)."""
    feature = FAMILY["feature"]
    identity = _labels(manifest)
    by = _by(feature.keys)
    present = _selector(feature.series("rows", window), identity)
    missing = _selector(feature.series("missing_rows", window), identity)
    counted = f"sum by ({by}) (increase({_selector(MISSING_METRIC, identity)}[{window}]))"
    rules: list[Rule] = [
        # `or 0 * present`: a feature without the counter is not nullable, never missing.
        {
            "record": feature.series("missing_rows", window),
            "expr": f"{counted}\n  or\n0 * {present}",
        },
        {
            "record": feature.series("missing_rate", window),
            "expr": f"{missing}\n  /\n({missing} + {present} > 0)",
        },
    ]
    if any(
        f.training_min is not None for f in manifest.features if not isinstance(f, CategoryFeature)
    ):
        outside = _selector(OUT_OF_RANGE_METRIC, identity)
        rules.append(
            {
                "record": feature.series("out_of_range_rate", window),
                "expr": f"sum by ({by}) (increase({outside}[{window}]))\n  /\n({present} > 0)",
            }
        )
    return rules


def _reference_missing_rates(manifest: Manifest, found: list[Distribution]) -> list[Rule]:
    scored = {d.feature for d in found}
    return [
        {
            "record": FAMILY["feature"].series("reference_missing_rate"),
            "expr": f"vector({f.missing_rate!r})",
            "labels": {**_labels(manifest), "feature": f.name},
        }
        for f in manifest.features
        if f.name in scored and f.missing_rate is not None
    ]


def _missing_rate_alert(
    manifest: Manifest, found: list[Distribution], alert_for: str, min_rows: int, warn: Warn | None
) -> list[Rule]:
    """A nullable feature missing far more often over the hour than in the reference
    data (a feature that is not nullable cannot be missing: such requests get a 422).

    rate > reference + jump and rate > factor * reference, i.e.
    rate - reference > max((factor - 1) * reference, jump). Shaped
    `(<rate> and <enough rows>) * (<that condition> as 1 or 0) > 0`, so the value in
    the summary is the rate and the one comparison with a number is at the top.
    """
    scored = {d.feature for d in found}
    watched = [f for f in manifest.features if f.nullable and f.name in scored]
    unknown = [f.name for f in watched if f.missing_rate is None]
    if warn is not None:
        for name in unknown:
            warn(f"no missing-rate alert for feature {name}: no reference missing rate")
    if len(unknown) == len(watched):
        return []
    feature = FAMILY["feature"]
    identity = _labels(manifest)
    on = f"on ({_by(feature.keys)})"
    names = "|".join(re.escape(f.name) for f in watched if f.missing_rate is not None)
    rate = _selector(feature.series("missing_rate", "1h"), identity)
    # Only the nullable features: the others' rate is 0 by construction.
    rate = f"{rate[:-1]}, feature=~{_quote(names)}}}"
    reference = _selector(feature.series("reference_missing_rate"), identity)
    missing = _selector(feature.series("missing_rows", "1h"), identity)
    present = _selector(feature.series("rows", "1h"), identity)
    bundle = "{{ $labels.model }} {{ $labels.version }}"
    return [
        {
            "alert": "MlApiMissingRateJump",
            "expr": f"(\n  {rate}\n    and {on}\n  {missing} + {present} >= {min_rows}\n)\n"
            f"  * {on}\n(\n  {rate}\n    - {on} ({reference} + clamp_min("
            f"{MISSING_RATE_FACTOR - 1} * {reference}, {MISSING_RATE_JUMP}))\n  > bool 0\n)\n"
            "> 0",
            "for": alert_for,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"Missing values in {{{{ $labels.feature }}}} of {bundle}: "
                'missing rate {{ $value | printf "%.2f" }} over the last hour',
                "description": "The share of rows missing {{ $labels.feature }} has stayed "
                f"more than {MISSING_RATE_JUMP} above, and over {MISSING_RATE_FACTOR} times, "
                f"its share in the reference data of {bundle} for {alert_for} (with at least "
                f"{min_rows} rows in the hour): an upstream source may have stopped sending "
                "it. Compare ml_api:feature_missing_rate:1h with "
                "ml_api:feature_reference_missing_rate on the Model health row.",
            },
        }
    ]


def _alerts(
    manifest: Manifest, found: list[Distribution], alert_for: str, min_rows: int
) -> list[Rule]:
    """PSI above DRIFT_THRESHOLD over the hour, with enough rows for it to mean something.

    Shaped `(<psi> and <enough rows>) > threshold` so the value in the summary is the PSI.
    """
    identity = _labels(manifest)
    alerts: list[Rule] = []
    for family in FAMILIES:
        if not any(d.family == family.name for d in found):
            continue
        psi = _selector(family.series("psi", "1h"), identity)
        rows = _selector(family.series("rows", "1h"), identity)
        what = "{{ $labels.feature }}" if family.name == "feature" else "the predictions"
        bundle = "{{ $labels.model }} {{ $labels.version }}"
        alerts.append(
            {
                "alert": "MlApiFeatureDrift"
                if family.name == "feature"
                else "MlApiPredictionDrift",
                "expr": f"(\n  {psi}\n    and on ({_by(family.keys)})\n  {rows} >= {min_rows}\n)\n"
                f"> {DRIFT_THRESHOLD}",
                "for": alert_for,
                "labels": {"severity": "warning"},
                "annotations": {
                    "summary": f"Drift in {what} of {bundle}: "
                    'PSI {{ $value | printf "%.2f" }} over the last hour',
                    "description": f"The population stability index of {what} against the "
                    f"reference data of {bundle} has stayed above {DRIFT_THRESHOLD} for "
                    f"{alert_for} (with at least {min_rows} rows in the hour): live traffic "
                    "no longer looks like the data the model was built on. Compare "
                    f"{family.series('bin_share', '1h')} with {family.series('reference_share')} "
                    "on the Model health row to see which bins moved.",
                },
            }
        )
    return alerts


def build_rules(
    manifest: Manifest,
    *,
    alert_for: str = DEFAULT_FOR,
    min_rows: int = DEFAULT_MIN_ROWS,
    warn: Warn | None = None,
) -> dict[str, Any]:
    """The rule file (as YAML-ready data) for one bundle."""
    found = distributions(manifest, warn)
    reference: list[Rule] = [
        {
            "record": FAMILY[d.family].series("reference_share"),
            "expr": _reference_share_expr(d),
            "labels": _labels(manifest, d),
        }
        for d in found
    ] + _reference_missing_rates(manifest, found)
    group = f"ml-api-drift:{manifest.name}:{manifest.version}"
    groups = [{"name": f"{group}:reference", "rules": reference}]
    groups += [
        {"name": f"{group}:{window}", "rules": _window_rules(manifest, found, window)}
        for window in WINDOWS
    ]
    groups.append(
        {
            "name": f"{group}:alerts",
            "rules": _alerts(manifest, found, alert_for, min_rows)
            + _missing_rate_alert(manifest, found, alert_for, min_rows, warn),
        }
    )
    return {"groups": [g for g in groups if g["rules"]]}


def load_manifest(model_dir: Path, name: str, version: str | None) -> Manifest:
    path = resolve_bundle_dir(model_dir, name, version) / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise BundleError(path.parent, f"unreadable: {MANIFEST_FILE}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.monitoring.rules",
        description="Write Prometheus drift rules (PSI per feature and of the prediction) "
        "for a model bundle.",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--model-version", help="default: the highest version present")
    parser.add_argument("--output", type=Path, required=True, help="the rule file to write")
    parser.add_argument(
        "--for", dest="alert_for", default=DEFAULT_FOR, help="alert `for:` duration"
    )
    parser.add_argument(
        "--prometheus-rule",
        action="store_true",
        help="write a prometheus-operator PrometheusRule (Kubernetes) instead of a rule file",
    )
    parser.add_argument(
        "--min-rows", type=int, default=DEFAULT_MIN_ROWS, help="rows in the hour an alert needs"
    )
    args = parser.parse_args(argv)

    def warn(message: str) -> None:
        print(f"rules: {message}", file=sys.stderr)

    try:
        manifest = load_manifest(args.model_dir, args.model_name, args.model_version)
    except (BundleError, ValueError) as exc:
        print(f"rules: {exc}", file=sys.stderr)
        return 2
    rules = build_rules(manifest, alert_for=args.alert_for, min_rows=args.min_rows, warn=warn)
    text = render(prometheus_rule(rules, manifest) if args.prometheus_rule else rules, manifest)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
