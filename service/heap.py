"""The worker's startup objects, kept out of the garbage collector's full passes.

A worker holds some 100,000 objects once its lifespan has run (FastAPI,
pydantic's schemas, the bundle, prometheus_client) and they live as long as
it does. Requests leave survivors behind (the buffered metric rows, until
their flush), so the collector's oldest generation fills up every few
thousand requests and each full pass walked every startup object again.
Frozen, they are never scanned; they are still freed normally if released.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what startup left as garbage, then exclude the survivors from
    every later collection. Called when a bundle is loaded: a later load
    (a retry, a new bundle) freezes what it added too."""
    gc.collect()
    gc.freeze()
