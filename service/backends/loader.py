"""Choose and load a backend from a verified bundle, with the refusals that protect it."""

from __future__ import annotations

from collections.abc import Set
from importlib import metadata

from service.backends.base import InferenceBackend
from service.bundle import BundleError, VerifiedBundle
from service.manifest import MODEL_FILE_ONNX, Backend


def choose_backend(bundle: VerifiedBundle, requested: Backend | None) -> Backend:
    manifest = bundle.manifest
    if requested is None:
        return manifest.backend
    if requested == "onnx" and manifest.backend != "onnx":
        reason = manifest.parity.reason or "no model.onnx"
        raise BundleError(
            bundle.path, f"BACKEND=onnx but the bundle has no usable ONNX model ({reason})"
        )
    return requested


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def check_sklearn_compatible(bundle: VerifiedBundle) -> None:
    """Refuse to unpickle an estimator pickled by another scikit-learn minor release.

    scikit-learn only guarantees pickles within one version; across minors a
    load may succeed and then predict wrongly.
    """
    trained = bundle.manifest.libraries.scikit_learn
    try:
        installed = metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:
        raise BundleError(bundle.path, "incompatible: scikit-learn is not installed") from None
    if _minor(installed) != _minor(trained):
        raise BundleError(
            bundle.path,
            f"incompatible library version: trained with scikit-learn {trained}, "
            f"installed {installed}",
        )


def load_backend(
    bundle: VerifiedBundle, requested: Backend | None, trusted_sha256: Set[str] = frozenset()
) -> InferenceBackend:
    """`trusted_sha256`: digests pinned outside MODEL_DIR; only those pickles are loaded."""
    backend = choose_backend(bundle, requested)
    manifest = bundle.manifest
    try:
        if backend == "onnx":
            # Imported here so an sklearn-only deployment needs no ONNX Runtime,
            # and an ONNX worker never imports scikit-learn.
            from service.backends.onnx import OnnxBackend

            return OnnxBackend(bundle.files[MODEL_FILE_ONNX], manifest)
        from service.backends.sklearn import (
            SklearnBackend,
            UntrustedModelError,
            load_skops,
            unpickle,
        )

        try:
            check_sklearn_compatible(bundle)
            native = bundle.files[manifest.native_model_file]
            if manifest.skops_trusted_types is not None:
                estimator = load_skops(native, manifest.skops_trusted_types)
            else:
                estimator = unpickle(native, trusted_sha256)
            return SklearnBackend(estimator, manifest)
        except UntrustedModelError as exc:
            raise BundleError(bundle.path, str(exc)) from None
    except BundleError:
        raise
    except Exception as exc:
        # Whatever the loader raises (corrupt protobuf, unpickling error,
        # missing module), the worker must refuse with a one-line reason.
        raise BundleError(
            bundle.path, f"unreadable: {backend} model: {type(exc).__name__}: {exc}"
        ) from None
