"""Find a model bundle and verify it before anything in it is loaded.

Every file's bytes are hashed and compared with the manifest first, and the
backends load those same verified bytes: a file swapped on disk after
verification is never read again. These checksums sit beside the files they
vouch for, so they catch accidents, not attackers: what may be unpickled is
decided by digests pinned outside MODEL_DIR (service.backends.sklearn).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from service.manifest import MANIFEST_FILE, SEMVER_RE, Manifest
from service.settings import PinnedBundle


class BundleError(Exception):
    """A bundle that must not be served; the message names the path and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"model bundle refused: {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: Manifest
    files: dict[str, bytes]
    # Pins the whole bundle: the manifest holds every other file's digest.
    manifest_sha256: str


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """Sort key following semver precedence: a pre-release sorts before its release."""
    match = SEMVER_RE.match(version)
    if match is None:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch = (int(part) for part in version.split("+")[0].split("-")[0].split("."))
    pre = match.group(4)
    if pre is None:
        return (major, minor, patch, 1, ())
    ids = tuple((0, int(i)) if i.isdigit() else (1, i) for i in pre.split("."))
    return (major, minor, patch, 0, ids)


def resolve_bundle_dir(model_dir: Path, name: str, version: str | None) -> Path:
    """The bundle directory to serve: the pinned version, or the highest one present.

    Names that are not semantic versions (such as training's temporary
    directories) are ignored, so a half-written bundle is never chosen.
    """
    model_root = model_dir / name
    if version is not None:
        return model_root / version
    if not model_root.is_dir():
        raise BundleError(model_root, "missing: no bundles for this model name")
    versions = [p.name for p in model_root.iterdir() if p.is_dir() and SEMVER_RE.match(p.name)]
    if not versions:
        raise BundleError(model_root, "missing: no version directories")
    return model_root / max(versions, key=semver_key)


def verify_bundle(path: Path, expected_name: str | None = None) -> VerifiedBundle:
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleError(path, "missing: no such bundle directory")
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(path, f"missing: no {MANIFEST_FILE}") from None
    except OSError as exc:
        raise BundleError(path, f"unreadable: {MANIFEST_FILE}: {exc.strerror}") from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        raise BundleError(path, f"invalid manifest: {where}: {first['msg']}") from None
    if path.name != manifest.version:
        raise BundleError(
            path, f"invalid manifest: version {manifest.version} does not match the directory"
        )
    if expected_name is not None and manifest.name != expected_name:
        raise BundleError(path, f"invalid manifest: name {manifest.name!r} != {expected_name!r}")

    files: dict[str, bytes] = {}
    for file_name, entry in manifest.files.items():
        try:
            data = (path / file_name).read_bytes()
        except FileNotFoundError:
            raise BundleError(path, f"missing: {file_name}") from None
        except OSError as exc:
            raise BundleError(path, f"unreadable: {file_name}: {exc.strerror}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise BundleError(
                path,
                f"checksum mismatch: {file_name} has sha256 {digest}, manifest says {entry.sha256}",
            )
        files[file_name] = data
    return VerifiedBundle(
        path=path, manifest=manifest, files=files, manifest_sha256=hashlib.sha256(raw).hexdigest()
    )


def verify_pinned(pin: PinnedBundle, expected_name: str) -> VerifiedBundle:
    """Exactly the bundle the master proved servable, byte for byte, or a refusal."""
    bundle = verify_bundle(pin.path, expected_name=expected_name)
    if bundle.manifest.version != pin.version:
        raise BundleError(
            pin.path, f"pinned version {pin.version}, the bundle is {bundle.manifest.version}"
        )
    if bundle.manifest_sha256 != pin.manifest_sha256:
        raise BundleError(
            pin.path,
            f"changed since the master proved it: {MANIFEST_FILE} has sha256 "
            f"{bundle.manifest_sha256}, pinned {pin.manifest_sha256}",
        )
    return bundle
