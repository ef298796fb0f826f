"""The master's copy of the API keys from `API_KEYS_URL` (service.auth.key_sync).

At start the master waits a little for a first complete copy, so its workers
do not begin by refusing every key while the keys service starts; then a
`follow` process keeps `API_KEYS_FILE` current beside the workers, whose key
ring re-reads the file in place. A process rather than a thread: the master
forks workers, and a fork while another thread holds a lock can hang the
child.
"""

from __future__ import annotations

import logging
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
        self._process = subprocess.Popen(command)
        log.info("API keys follow %s into %s", url, settings.api_keys_file)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()


KEY_FOLLOWER = KeyFollower()
