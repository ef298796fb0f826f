"""The startup heap is frozen once a bundle is loaded (service.heap)."""

from __future__ import annotations

import gc

from service.heap import freeze_startup_heap


def test_freezing_moves_the_live_objects_out_of_the_collected_generations() -> None:
    kept = [object() for _ in range(10)]
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > before
        assert gc.get_count() == (0, 0, 0)
    finally:
        gc.unfreeze()
    assert kept
