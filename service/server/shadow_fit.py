"""Whether a candidate can shadow the served model: the same task and the same
features, so both score the very same rows and their answers mean the same.

Read by the master from the manifests alone (it never loads a model).
"""

from __future__ import annotations

import hashlib

from service.bundle import BundleError
from service.manifest import CategoryFeature, FeatureSpec, Manifest
from service.settings import PinnedBundle

MANIFEST_FILE = "manifest.json"


def pinned_manifest(pin: PinnedBundle) -> Manifest:
    """The manifest of a bundle the master proved, provided it is still the one proved."""
    try:
        raw = (pin.path / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise BundleError(pin.path, f"unreadable: {MANIFEST_FILE}: {exc.strerror}") from None
    if hashlib.sha256(raw).hexdigest() != pin.manifest_sha256:
        raise BundleError(pin.path, f"changed since its trial: {MANIFEST_FILE}")
    return Manifest.model_validate_json(raw)


def _feature_shape(feature: FeatureSpec) -> str:
    if isinstance(feature, CategoryFeature):
        return f"category {feature.categories}"
    return feature.kind


def mismatch(primary: Manifest, candidate: Manifest) -> str | None:
    """The first difference that stops `candidate` shadowing `primary`, or None."""
    if candidate.task != primary.task:
        return f"task differs: serving {primary.task}, candidate {candidate.task}"
    names, candidate_names = primary.feature_names, candidate.feature_names
    if candidate_names != names:
        missing = [n for n in names if n not in candidate_names]
        extra = [n for n in candidate_names if n not in names]
        if missing or extra:
            return (
                f"features differ: the candidate lacks {missing or 'none'}, "
                f"has extra {extra or 'none'}"
            )
        return f"features differ in order: serving {names}, candidate {candidate_names}"
    for served, other in zip(primary.features, candidate.features, strict=True):
        if _feature_shape(served) != _feature_shape(other):
            return (
                f"feature {served.name!r} differs: serving {_feature_shape(served)}, "
                f"candidate {_feature_shape(other)}"
            )
    if candidate.classes != primary.classes:
        return f"classes differ: serving {primary.classes}, candidate {candidate.classes}"
    return None


def check_fit(primary: PinnedBundle, candidate: PinnedBundle) -> None:
    """Raises BundleError naming why `candidate` cannot shadow `primary`."""
    if candidate.version == primary.version:
        raise BundleError(candidate.path, f"shadow: {candidate.version} is the version serving")
    reason = mismatch(pinned_manifest(primary), pinned_manifest(candidate))
    if reason is not None:
        raise BundleError(candidate.path, f"cannot shadow {primary.version}: {reason}")
