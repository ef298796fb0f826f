"""The master's copy of the API keys from `API_KEYS_URL` (service.auth.key_sync).

At start the master waits a little for a first complete copy, so its workers
do not begin by refusing every key while the keys service starts; then a
`follow` process keeps `API_KEYS_FILE` current beside the workers, whose key
ring re-reads the file in place. A process rather than a thread: the master
forks workers, and a fork while another thread holds a lock can hang the
child. A shell loop starts it again if it ends (killed, out of memory): a
copy nobody follows would keep every key revoked after (the workers are not
ready meanwhile: service.auth.follower_heartbeat). The loop and the follower
are one process group, stopped together.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess

from service.auth import key_sync
from service.settings import ServerSettings

# Longer than the keys service takes to start, shorter than a task's health
# check start period.
FIRST_COPY_SECONDS = 15.0


class KeyFollower:
    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, settings: ServerSettings, log: logging.Logger) -> None:
        url = settings.api_keys_url
        if url is None:
            return
        follower = key_sync.Follower(url, settings.api_keys_file)
        if not follower.sync_within(FIRST_COPY_SECONDS):
            log.warning(
                "API keys: no complete copy from %s within %.0f s; %s keeps what it holds"
                " (none: every key is refused) until one arrives",
                url,
                FIRST_COPY_SECONDS,
                settings.api_keys_file,
            )
        command = key_sync.follower_command(
            url, settings.api_keys_file, settings.api_keys_poll_interval
        )
        self._process = subprocess.Popen(["sh", "-c", restarting(command)], start_new_session=True)
        log.info("API keys follow %s into %s", url, settings.api_keys_file)

    def stop(self) -> None:
        if self._process is None:
            return
        # The whole group, even if the loop itself is gone: its follower is not.
        for sent in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self._process.pid, sent)
            except ProcessLookupError:
                return
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
            return


def restarting(command: list[str]) -> str:
    """A shell loop that runs `command` again a second after it ends."""
    ended = {"level": "ERROR", "logger": "ml-api.key-sync", "message": "follower ended; restarting"}
    # printf's format: the JSON line with the exit status for %d.
    line = json.dumps({**ended, "exit": 0}).replace('"exit": 0', '"exit": %d') + "\\n"
    return (
        f'while :; do {shlex.join(command)} || printf {shlex.quote(line)} "$?" >&2; sleep 1; done'
    )


KEY_FOLLOWER = KeyFollower()
