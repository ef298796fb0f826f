"""Prometheus metrics, exact across Gunicorn workers.

prometheus_client picks its value storage when it is first imported, so this
package makes sure PROMETHEUS_MULTIPROC_DIR is set before that happens. Only
modules inside this package import prometheus_client, and only
client_internals touches its internals.
"""

from __future__ import annotations

from service.metrics import client_internals
from service.metrics.store import ensure_multiproc_dir

ensure_multiproc_dir()
client_internals.install_lean_values()
