"""Whether a keys file copied from `API_KEYS_URL` is still being followed.

A copy nobody keeps current fails open for every key revoked after its
follower stopped. So the follower (service.auth.key_sync) touches a stamp
beside the copy every interval, from a thread of its own, and the workers'
key ring reads its age: a replica whose stamp is stale is not ready, so the
orchestrator replaces it (the master also starts a follower that ended
again: service.server.key_follower). The stamp says the follower runs and
its attempts end, not that the keys service answers: a keys service that
is down or slow to resolve (on every replica at once) must not make them
all unready; their copies stay the last good one.

Standard library only, as service.auth.keyfile.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

# Beats that may be missed (a busy machine) before the follower counts as
# gone, plus a margin: 10 s at the default interval of a second.
MISSED_BEATS = 5
MARGIN_SECONDS = 5.0
# An attempt still running after this long is hung (each read waits at most
# a couple of seconds, but an answer can trickle, and a name lookup can wait
# out several resolver timeouts): the stamp stops until an attempt ends.
ATTEMPT_HUNG_SECONDS = 60.0


def stamp_path(keys_file: Path) -> Path:
    return keys_file.with_name(keys_file.name + ".followed")


def touch(keys_file: Path) -> None:
    """Every interval; raises OSError when the stamp cannot be written (then
    neither can the copy)."""
    stamp_path(keys_file).touch()


def stale_after(interval: float) -> float:
    """Seconds without a touch after which the follower counts as gone."""
    return MISSED_BEATS * interval + MARGIN_SECONDS


def seconds_since_touch(keys_file: Path, since_missing: float) -> float:
    """The stamp's age; with no stamp (the follower not started yet, or
    never), the time since `since_missing` (a time.time()). Wall-clock
    times, as file times are: a clock stepped back hides a stale stamp for
    as long as the step."""
    try:
        touched = stamp_path(keys_file).stat().st_mtime
    except FileNotFoundError:
        touched = since_missing
    except OSError:
        return math.inf  # cannot tell: counts as gone
    return max(0.0, time.time() - touched)
