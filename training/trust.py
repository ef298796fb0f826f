"""Record a packaged bundle's native model as trusted, where the service reads
its trusted digests (TRUSTED_DIGESTS_FILE, outside MODEL_DIR): the person who
packages a model vouches for the file they gave, so serving it needs no
digest copied by hand."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from service.manifest import MODEL_FILE_SKLEARN
from training.errors import TrainingError


def check_outside(digests_file: Path, output_dir: Path) -> None:
    """The service refuses a digests file inside MODEL_DIR (whoever writes bundles
    could vouch for them); refuse it before anything is written."""
    if digests_file.resolve().is_relative_to(output_dir.resolve()):
        raise TrainingError(
            f"--trusted-digests-file {digests_file} is inside --output-dir {output_dir}: "
            "the service refuses digests kept beside the bundles they vouch for"
        )


def record_digest(bundle: Path, digests_file: Path) -> str:
    """Append the bundle's model digest (sha256sum format) unless already there;
    returns the digest."""
    digest = hashlib.sha256((bundle / MODEL_FILE_SKLEARN).read_bytes()).hexdigest()
    line = f"{digest}  {bundle.parent.name}/{bundle.name}/{MODEL_FILE_SKLEARN}\n"
    try:
        existing = digests_file.read_text() if digests_file.exists() else ""
        if any(entry.split(" ", 1)[0] == digest for entry in existing.splitlines()):
            return digest
        digests_file.parent.mkdir(parents=True, exist_ok=True)
        with digests_file.open("a") as handle:
            if existing and not existing.endswith("\n"):
                handle.write("\n")
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise TrainingError(
            f"bundle {bundle} written, but its digest could not be recorded in "
            f"{digests_file}: {exc.strerror or exc}"
        ) from None
    return digest
