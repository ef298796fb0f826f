"""The drift rules generated from a manifest, under `promtool test rules`: synthetic
counters at the reference shares fire nothing, a moved feature or class mix fires
its alert with the PSI Python computes from the same counts, a quiet hour does not.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.manifest import CategoryFeature, Manifest
from service.metrics.instruments import MAX_CATEGORY_LABELS, OTHER_CATEGORY
from service.monitoring.distributions import INF, Distribution, distributions
from service.monitoring.rule_file import render
from service.monitoring.rules import DEFAULT_MIN_ROWS, SHARE_FLOOR, build_rules
from tests.support.bundles import train_bundle
from tests.support.prometheus import binary

LABELS = {"model": "iris", "version": "1.0.0"}
MINUTES = 40  # evaluated at 30m: 15m of `for:` after a quarter hour of data


@pytest.fixture(scope="module")
def regressor_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("regressor")
    return train_bundle(
        directory, "--dataset", "diabetes", "--n-estimators", "20", "--name", "iris"
    )


def _manifest(trained_bundle: Path) -> Manifest:
    return Manifest.model_validate_json((trained_bundle / "manifest.json").read_bytes())


def _counts(distribution: Distribution, per_minute: int) -> list[int]:
    """Rows per minute in each bin, at the reference shares."""
    return [round(b.reference * per_minute) for b in distribution.bins]


def _psi(counts: list[int], distribution: Distribution) -> float:
    total = sum(counts)
    score = 0.0
    for count, b in zip(counts, distribution.bins, strict=True):
        live, expected = max(count / total, SHARE_FLOOR), max(b.reference, SHARE_FLOOR)
        score += (live - expected) * math.log(live / expected)
    return score


def _series(
    distribution: Distribution, counts: list[int], bundle: dict[str, str]
) -> list[dict[str, str]]:
    """Counters that grow by `counts` every minute, as the worker exports them."""
    extra = {} if distribution.feature is None else {"feature": distribution.feature}
    if distribution.cumulative:
        metric = "model_feature_value_bucket" if extra else "model_prediction_value_bucket"
        running = [sum(counts[: i + 1]) for i in range(len(counts))]
        per_bin = [({"le": b.label}, c) for b, c in zip(distribution.bins, running, strict=True)]
    else:
        metric, label = (
            ("model_feature_category_total", "value")
            if extra
            else ("model_predictions_total", "class")
        )
        per_bin = [({label: b.label}, c) for b, c in zip(distribution.bins, counts, strict=True)]
    series = []
    for labels, step in per_bin:
        every = {**bundle, **extra, **labels, "instance": "api:8000", "job": "whatever"}
        selector = ", ".join(f'{k}="{v}"' for k, v in every.items())
        series.append({"series": f"{metric}{{{selector}}}", "values": f"0+{step}x{MINUTES}"})
    return series


def _promtool_test(tmp_path: Path, rules: dict[str, Any], tests: list[dict[str, Any]]) -> None:
    (tmp_path / "drift.yml").write_text(yaml.safe_dump(rules))
    spec = {"rule_files": ["drift.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "drift_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [binary("promtool"), "test", "rules", "drift_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _by_name(found: list[Distribution]) -> dict[str, Distribution]:
    return {d.feature or "prediction": d for d in found}


def _input(
    found: list[Distribution],
    moved: dict[str, list[int]],
    per_minute: int,
    bundle: dict[str, str] = LABELS,
) -> list[Any]:
    series = []
    for name, d in _by_name(found).items():
        series += _series(d, moved.get(name, _counts(d, per_minute)), bundle)
    return series


def _alert(
    name: str, feature: str | None, psi: float, bundle: dict[str, str] = LABELS
) -> dict[str, Any]:
    labels = {**bundle, "severity": "warning", "alertname": name}
    what = "the predictions"
    if feature is not None:
        labels["feature"] = feature
        what = feature
    of = f"{bundle['model']} {bundle['version']}"
    summary = f"Drift in {what} of {of}: PSI {psi:.2f} over the last hour"
    return {"exp_labels": labels, "exp_annotations": {"summary": summary}}


def _strip_descriptions(rules: dict[str, Any]) -> dict[str, Any]:
    # The summary is pinned exactly; the description is prose.
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.get("annotations", {}).pop("description", None)
    return rules


def test_reference_traffic_fires_nothing_and_a_moved_feature_fires_with_its_psi(
    trained_bundle: Path, tmp_path: Path
) -> None:
    manifest = _manifest(trained_bundle)
    found = distributions(manifest)
    feature = _by_name(found)["sepal_width"]
    # Every row above the top decile: the +Inf bin.
    moved = [0] * (len(feature.bins) - 1) + [100]
    assert feature.bins[-1].label == INF
    quiet = (DEFAULT_MIN_ROWS // 60) // 2  # rows a minute: half the guard in an hour
    _promtool_test(
        tmp_path,
        _strip_descriptions(build_rules(manifest)),
        [
            {
                "interval": "1m",
                "input_series": _input(found, {}, per_minute=100),
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "MlApiFeatureDrift", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "MlApiPredictionDrift", "exp_alerts": []},
                ],
            },
            {
                "interval": "1m",
                "input_series": _input(found, {"sepal_width": moved}, per_minute=100),
                "alert_rule_test": [
                    # Pending, not yet firing, before `for:` has passed.
                    {"eval_time": "10m", "alertname": "MlApiFeatureDrift", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "MlApiFeatureDrift",
                        "exp_alerts": [
                            _alert("MlApiFeatureDrift", "sepal_width", _psi(moved, feature))
                        ],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": _input(
                    found,
                    {"sepal_width": [0] * (len(feature.bins) - 1) + [quiet]},
                    per_minute=quiet,
                ),
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "MlApiFeatureDrift", "exp_alerts": []},
                ],
            },
        ],
    )


def test_a_skewed_class_mix_fires_prediction_drift(trained_bundle: Path, tmp_path: Path) -> None:
    manifest = _manifest(trained_bundle)
    found = distributions(manifest)
    prediction = _by_name(found)["prediction"]
    skewed = [5, 5, 90]
    _promtool_test(
        tmp_path,
        _strip_descriptions(build_rules(manifest)),
        [
            {
                "interval": "1m",
                "input_series": _input(found, {"prediction": skewed}, per_minute=100),
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "MlApiPredictionDrift",
                        "exp_alerts": [
                            _alert("MlApiPredictionDrift", None, _psi(skewed, prediction))
                        ],
                    },
                    {"eval_time": "30m", "alertname": "MlApiFeatureDrift", "exp_alerts": []},
                ],
            }
        ],
    )


def _text(metric: str, labels: dict[str, str]) -> str:
    return metric + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _counter(metric: str, feature: str, per_minute: int) -> dict[str, str]:
    labels = {**LABELS, "feature": feature, "instance": "api:8000", "job": "whatever"}
    return {"series": _text(metric, labels), "values": f"0+{per_minute}x{MINUTES}"}


def _missing_alert(feature: str, rate: float) -> dict[str, Any]:
    labels = {**LABELS, "severity": "warning", "alertname": "MlApiMissingRateJump"}
    summary = (
        f"Missing values in {feature} of {LABELS['model']} {LABELS['version']}: "
        f"missing rate {rate:.2f} over the last hour"
    )
    return {"exp_labels": {**labels, "feature": feature}, "exp_annotations": {"summary": summary}}


def test_a_jump_in_a_nullable_features_missing_rate_fires_and_its_usual_rate_does_not(
    trained_bundle: Path, tmp_path: Path
) -> None:
    iris = _manifest(trained_bundle)
    # petal_width made nullable, missing from 5% of the reference rows.
    features = [
        f.model_copy(update={"nullable": True, "missing_rate": 0.05})
        if f.name == "petal_width"
        else f
        for f in iris.features
    ]
    manifest = iris.model_copy(update={"features": features})
    found = distributions(manifest)
    present = sum(_counts(_by_name(found)["petal_width"], 1000))

    def scenario(missing: int, per_minute: int = 1000) -> list[Any]:
        return [
            *_input(found, {}, per_minute=per_minute),
            _counter("model_feature_missing_total", "petal_width", missing),
            _counter("model_feature_out_of_range_total", "sepal_length", per_minute // 10),
        ]

    def rate(name: str, feature: str, value: float) -> dict[str, Any]:
        labels = {**LABELS, "feature": feature}
        return {
            "expr": f'{name}{{feature="{feature}"}}',
            "eval_time": "30m",
            "exp_samples": [
                {
                    "labels": _text(name, labels),
                    "value": value,
                }
            ],
        }

    jump = 400  # missing rows a minute: 400 / (400 + 1000), against 5%
    quiet = 5  # rows a minute: far below the guard in an hour
    _promtool_test(
        tmp_path,
        _strip_descriptions(build_rules(manifest)),
        [
            {
                "interval": "1m",
                "input_series": scenario(missing=50),
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "MlApiMissingRateJump", "exp_alerts": []},
                ],
                "promql_expr_test": [
                    rate("ml_api:feature_missing_rate:1h", "petal_width", 50 / (50 + present)),
                    # Not nullable: never missing (such requests are rejected).
                    rate("ml_api:feature_missing_rate:1h", "sepal_length", 0),
                    rate("ml_api:feature_reference_missing_rate", "petal_width", 0.05),
                    rate(
                        "ml_api:feature_out_of_range_rate:1h",
                        "sepal_length",
                        100 / sum(_counts(_by_name(found)["sepal_length"], 1000)),
                    ),
                ],
            },
            {
                "interval": "1m",
                "input_series": scenario(missing=jump),
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "MlApiMissingRateJump", "exp_alerts": []},
                    {
                        "eval_time": "30m",
                        "alertname": "MlApiMissingRateJump",
                        "exp_alerts": [_missing_alert("petal_width", jump / (jump + present))],
                    },
                    {"eval_time": "30m", "alertname": "MlApiFeatureDrift", "exp_alerts": []},
                ],
            },
            {
                "interval": "1m",
                "input_series": scenario(missing=quiet, per_minute=quiet),
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "MlApiMissingRateJump", "exp_alerts": []},
                ],
            },
        ],
    )


def test_only_nullable_features_get_a_missing_rate_alert(trained_bundle: Path) -> None:
    iris = _manifest(trained_bundle)
    said: list[str] = []
    text = render(build_rules(iris, warn=said.append), iris)
    assert "ml_api:feature_missing_rate:1h" in text
    assert "MlApiMissingRateJump" not in text
    nullable = iris.model_copy(
        update={
            "features": [
                f.model_copy(update={"nullable": True, "missing_rate": None}) for f in iris.features
            ]
        }
    )
    assert "MlApiMissingRateJump" not in render(build_rules(nullable, warn=said.append), iris)
    assert any("no missing-rate alert for feature petal_width" in line for line in said), said


def test_reference_shares_are_the_bins_as_the_live_histogram_counts_them(
    trained_bundle: Path,
) -> None:
    manifest = _manifest(trained_bundle)
    (width,) = [f for f in manifest.features if f.name == "petal_width"]
    assert not isinstance(width, CategoryFeature)
    assert width.deciles is not None
    # Iris petal widths tie at 0.2 for the two lowest deciles: one edge, one bin
    # holding far more than 10% of the rows.
    assert width.deciles[0] == width.deciles[1]
    bins = _by_name(distributions(manifest))["petal_width"].bins
    assert len(bins) == len(set(width.deciles)) + 1
    assert bins[0].reference > 0.15
    assert sum(b.reference for b in bins) == pytest.approx(1.0)


def test_a_bundle_without_reference_shares_gets_no_score_for_them_and_says_so(
    trained_bundle: Path,
) -> None:
    manifest = _manifest(trained_bundle)
    features = [
        f.model_copy(update={"bin_shares": None}) if f.name == "sepal_length" else f
        for f in manifest.features
    ]
    old = manifest.model_copy(update={"features": features, "prediction_shares": None})
    said: list[str] = []
    found = distributions(old, said.append)
    assert "sepal_length" not in _by_name(found)
    assert "prediction" not in _by_name(found)
    assert len(found) == len(manifest.features) - 1
    assert any("sepal_length" in line and "bin shares" in line for line in said), said
    assert any("prediction" in line for line in said), said
    text = render(build_rules(old), old)
    assert "MlApiPredictionDrift" not in text
    assert 'feature="sepal_length"' not in text


def test_a_category_feature_is_scored_over_its_values_with_the_rest_as_other(
    trained_bundle: Path, tmp_path: Path
) -> None:
    manifest = _manifest(trained_bundle)
    # 60 values: the 50 most frequent counted by name, the last 10 together.
    values = [f"v{i:02d}" for i in range(60)]
    weights = [60 - i for i in range(60)]
    colour = CategoryFeature(
        name="colour",
        description="a category",
        categories=values,
        frequencies=[w / sum(weights) for w in weights],
    )
    with_category = manifest.model_copy(update={"features": [*manifest.features, colour]})
    found = distributions(with_category)
    bins = _by_name(found)["colour"].bins
    assert [b.label for b in bins] == [*values[:MAX_CATEGORY_LABELS], OTHER_CATEGORY]
    assert bins[-1].reference == pytest.approx(sum(weights[50:]) / sum(weights))
    # Every row in the rarest named value.
    moved = [0] * (len(bins) - 2) + [100, 0]
    _promtool_test(
        tmp_path,
        _strip_descriptions(build_rules(with_category)),
        [
            {
                "interval": "1m",
                "input_series": _input(found, {}, per_minute=1000),
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "MlApiFeatureDrift", "exp_alerts": []},
                ],
            },
            {
                "interval": "1m",
                "input_series": _input(found, {"colour": moved}, per_minute=1000),
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "MlApiFeatureDrift",
                        "exp_alerts": [
                            _alert(
                                "MlApiFeatureDrift",
                                "colour",
                                _psi(moved, _by_name(found)["colour"]),
                            )
                        ],
                    },
                ],
            },
        ],
    )


def test_a_regressor_is_scored_over_its_prediction_deciles(
    regressor_bundle: Path, tmp_path: Path
) -> None:
    manifest = _manifest(regressor_bundle)
    found = distributions(manifest)
    prediction = _by_name(found)["prediction"]
    assert prediction.cumulative
    assert manifest.target_statistics is not None
    assert len(prediction.bins) == len(set(manifest.target_statistics.deciles)) + 1
    # Every prediction above the target's top decile.
    moved = [0] * (len(prediction.bins) - 1) + [100]
    bundle = {"model": manifest.name, "version": manifest.version}
    _promtool_test(
        tmp_path,
        _strip_descriptions(build_rules(manifest)),
        [
            {
                "interval": "1m",
                "input_series": _input(found, {}, per_minute=1000, bundle=bundle),
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "MlApiPredictionDrift", "exp_alerts": []},
                ],
            },
            {
                "interval": "1m",
                "input_series": _input(
                    found, {"prediction": moved}, per_minute=1000, bundle=bundle
                ),
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "MlApiPredictionDrift",
                        "exp_alerts": [
                            _alert("MlApiPredictionDrift", None, _psi(moved, prediction), bundle)
                        ],
                    },
                ],
            },
        ],
    )
