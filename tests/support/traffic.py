"""Concurrent prediction traffic with a new connection per request (what nginx
sees upstream), recording every answer's status and model version."""

from __future__ import annotations

import threading
from collections import Counter
from types import TracebackType

import httpx

from tests.support.bundles import SETOSA


class Traffic:
    def __init__(self, url: str, threads: int = 4, headers: dict[str, str] | None = None) -> None:
        self._url = f"{url}/predict"
        self._headers = headers or {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._send) for _ in range(threads)]

    def _send(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=30, limits=limits) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self._url, json=SETOSA, headers=self._headers)
                except httpx.HTTPError as exc:
                    outcome, failed = repr(exc), True
                else:
                    failed = response.status_code != 200
                    if failed:
                        outcome = f"{response.status_code} {response.text[:200]}"
                    else:
                        outcome = response.json()["model_version"]
                with self._lock:
                    (self.failures if failed else self.versions).append(outcome)

    def failure_statuses(self) -> Counter[str]:
        """The failures by status code (or exception), without their bodies."""
        with self._lock:
            return Counter(failure.split(" ", 1)[0] for failure in self.failures)

    @property
    def sent(self) -> int:
        with self._lock:
            return len(self.versions) + len(self.failures)

    def last_versions(self, count: int) -> list[str]:
        with self._lock:
            return self.versions[-count:]

    def versions_since(self, mark: int) -> Counter[str]:
        with self._lock:
            return Counter(self.versions[mark:])

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
