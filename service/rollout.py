"""Guarding SIGHUP rollouts in the Gunicorn master.

A worker that refuses its bundle makes Gunicorn halt the whole server, so a
bad bundle copied into MODEL_DIR followed by SIGHUP would take a healthy
service down. Before new workers are spawned, the master verifies the bundle
they would load (manifest and checksums; nothing is unpickled). If it is not
servable, the new workers are pinned to the version already serving and the
reason is logged; the next SIGHUP tries the newest version again.
"""

from __future__ import annotations

import os

from service.bundle import BundleError, resolve_bundle_dir, verify_bundle
from service.settings import ServiceSettings

_PIN_VARIABLE = "MODEL_VERSION"


class RolloutGuard:
    def __init__(self) -> None:
        self.serving: str | None = None
        self._pinned = False

    def before_workers_start(self) -> None:
        """At master start: remember the version the first workers will load.
        A missing bundle is left for the workers to refuse, with the reason."""
        settings = ServiceSettings()
        try:
            path = resolve_bundle_dir(
                settings.model_dir, settings.model_name, settings.model_version
            )
        except BundleError:
            return
        self.serving = path.name

    def before_reload(self) -> str | None:
        """Returns a refusal message when the rollout was held back, else None."""
        if self._pinned:
            # Our own pin from a held-back rollout: look for the newest again.
            os.environ.pop(_PIN_VARIABLE, None)
            self._pinned = False
        settings = ServiceSettings()
        try:
            path = resolve_bundle_dir(
                settings.model_dir, settings.model_name, settings.model_version
            )
            verify_bundle(path, expected_name=settings.model_name)
        except BundleError as exc:
            if self.serving is None or settings.model_version is not None:
                return None  # nothing to fall back to: let the workers refuse loudly
            os.environ[_PIN_VARIABLE] = self.serving
            self._pinned = True
            return f"rollout held back, staying on {self.serving}: {exc}"
        self.serving = path.name
        return None


GUARD = RolloutGuard()
