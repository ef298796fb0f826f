"""What drift is measured on: the distributions a manifest lets us compare, each
as bins with the share of reference rows in them, labelled as the workers count
them (service.metrics.instruments)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.manifest import CategoryFeature, Manifest, bin_edges
from service.metrics.instruments import MAX_CATEGORY_LABELS, OTHER_CATEGORY, bucket_label

INF = "+Inf"

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Bin:
    label: str  # the `bin` label: the bucket's upper edge, a category or a class
    reference: float  # the share of reference rows in this bin


@dataclass(frozen=True)
class Distribution:
    """One compared distribution: a feature, or the prediction (feature None).

    `cumulative` distributions come from a histogram (the bin label is the
    bucket's `le`); the others from a counter with one series per bin label.
    """

    feature: str | None
    bins: tuple[Bin, ...]
    cumulative: bool

    @property
    def family(self) -> str:
        return "prediction" if self.feature is None else "feature"


def _histogram_bins(deciles: list[float], shares: list[float]) -> tuple[Bin, ...]:
    uppers = [bucket_label(edge) for edge in bin_edges(deciles)] + [INF]
    return tuple(Bin(upper, share) for upper, share in zip(uppers, shares, strict=True))


def _category_bins(feature: CategoryFeature, frequencies: list[float]) -> tuple[Bin, ...]:
    """Bins as the worker counts them: the first MAX_CATEGORY_LABELS values by
    name, the rest together as 'other' (expected at their summed share)."""
    named = feature.categories[:MAX_CATEGORY_LABELS]
    bins = [Bin(value, share) for value, share in zip(named, frequencies, strict=False)]
    if len(feature.categories) > len(named):
        bins.append(Bin(OTHER_CATEGORY, sum(frequencies[len(named) :])))
    return tuple(bins)


def distributions(manifest: Manifest, warn: Warn | None = None) -> list[Distribution]:
    """What the manifest lets us compare; what it does not is reported through warn."""
    found: list[Distribution] = []
    skipped: list[str] = []
    for feature in manifest.features:
        if isinstance(feature, CategoryFeature):
            if feature.frequencies is None:
                skipped.append(f"feature {feature.name}: no reference frequencies")
            else:
                bins = _category_bins(feature, feature.frequencies)
                found.append(Distribution(feature.name, bins, cumulative=False))
        elif feature.deciles is None or feature.bin_shares is None:
            # A flat 10% per bin would be wrong wherever deciles tie.
            skipped.append(
                f"feature {feature.name}: no reference bin shares (a bundle older than "
                "drift scores: train or package it again with its reference data)"
            )
        else:
            bins = _histogram_bins(feature.deciles, feature.bin_shares)
            found.append(Distribution(feature.name, bins, cumulative=True))
    shares = manifest.prediction_shares
    if shares is None:
        skipped.append("prediction: no reference prediction shares")
    elif manifest.classes is not None:
        bins = tuple(Bin(name, share) for name, share in zip(manifest.classes, shares, strict=True))
        found.append(Distribution(None, bins, cumulative=False))
    elif manifest.target_statistics is not None:
        bins = _histogram_bins(manifest.target_statistics.deciles, shares)
        found.append(Distribution(None, bins, cumulative=True))
    if warn is not None:
        for reason in skipped:
            warn(f"no drift score for {reason}")
    return found
