"""API keys with a real multi-worker Gunicorn: keys added and revoked while
it serves reach every worker, the per-key metric is exact across workers,
and no key appears in any log line. Behind a real nginx, each key has its
own rate limit."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.auth import keyfile
from tests.support.bundles import SETOSA
from tests.support.nginx import NJS_MODULE, running_nginx
from tests.support.scrape import sample, scrape
from tests.support.servers import Gunicorn, running_gunicorn, wait_for

pytestmark = pytest.mark.process

WORKERS = 3
# The bound for a key change to reach every worker.
LIVE_WITHIN_SECONDS = 5.0


@dataclass
class Keys:
    path: Path
    minted: dict[str, str] = field(default_factory=dict)  # every key handed out, by id

    def add(self, key_id: str) -> str:
        key = keyfile.mint_key()
        keyfile.update(self.path, add=keyfile.StoredKey(key_id, keyfile.digest_of(key)))
        self.minted[key_id] = key
        return key

    def revoke(self, key_id: str) -> None:
        keyfile.update(self.path, revoke=key_id)


def _client() -> httpx.Client:
    # No keep-alive: every request may land on any worker.
    return httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "secrets" / "api-keys")


@pytest.fixture
def server(model_dir: Path, tmp_path: Path, keys: Keys) -> Iterator[Gunicorn]:
    keys.add("alice")
    keys.add("bob")
    env = {"API_KEYS_FILE": str(keys.path)}
    with running_gunicorn(model_dir, tmp_path / "logs", workers=WORKERS, env=env) as running:
        yield running


def _statuses_by_worker(
    server: Gunicorn, client: httpx.Client, key: str, requests: int
) -> dict[int, set[int]]:
    """Send requests with `key`; which statuses each worker answered."""
    sent: dict[str, int] = {}
    for _ in range(requests):
        request_id = uuid.uuid4().hex
        response = client.get(
            f"{server.url}/model-info", headers={"X-API-Key": key, "X-Request-ID": request_id}
        )
        sent[request_id] = response.status_code
    answered: dict[int, set[int]] = {}
    for line in server.access_log():
        if line["request_id"] in sent:
            answered.setdefault(line["worker_pid"], set()).add(sent[line["request_id"]])
    return answered


class LatestAnswers:
    """What each worker answered a key most recently, over repeated probes
    (connections land on workers unevenly, so one probe may miss a worker)."""

    def __init__(self, server: Gunicorn, client: httpx.Client, key: str) -> None:
        self.server, self.client, self.key = server, client, key
        self.latest: dict[int, set[int]] = {}

    def all_workers_answer(self, status: int) -> bool:
        self.latest.update(_statuses_by_worker(self.server, self.client, self.key, 2 * WORKERS))
        return set(self.latest) == self.server.worker_pids() and all(
            statuses == {status} for statuses in self.latest.values()
        )


def _accepted_by_every_worker(server: Gunicorn, client: httpx.Client, key: str) -> None:
    answers = LatestAnswers(server, client, key)
    wait_for(
        lambda: answers.all_workers_answer(200),
        LIVE_WITHIN_SECONDS,
        interval=0.05,
        what="the new key to be accepted by every worker",
    )


def test_keys_added_and_revoked_while_serving_reach_every_worker(
    server: Gunicorn, keys: Keys
) -> None:
    workers = server.worker_pids()
    with _client() as client:
        bob = keys.minted["bob"]
        assert client.get(f"{server.url}/model-info", headers={"X-API-Key": bob}).is_success
        carol = keys.add("carol")
        keys.revoke("bob")
        with_carol = LatestAnswers(server, client, carol)
        with_bob = LatestAnswers(server, client, bob)
        wait_for(
            lambda: with_carol.all_workers_answer(200) & with_bob.all_workers_answer(401),
            LIVE_WITHIN_SECONDS,
            interval=0.05,
            what="carol accepted and bob refused by every worker",
        )
        # And it stays so, whichever worker answers.
        for statuses in _statuses_by_worker(server, client, carol, 3 * WORKERS).values():
            assert statuses == {200}
        for statuses in _statuses_by_worker(server, client, bob, 3 * WORKERS).values():
            assert statuses == {401}
        alice = keys.minted["alice"]
        assert client.post(
            f"{server.url}/predict", json=SETOSA, headers={"Authorization": f"Bearer {alice}"}
        ).is_success
    assert server.worker_pids() == workers  # no restart was needed


def test_per_key_counts_are_exact_across_workers_and_no_key_is_logged(
    server: Gunicorn, keys: Keys
) -> None:
    alice, bob = keys.minted["alice"], keys.minted["bob"]
    wrong = keyfile.mint_key()
    keys.minted["wrong"] = wrong
    sent: Counter[tuple[str, str]] = Counter()
    # Even rounds on one kept connection, odd rounds on new ones: the worker
    # holding the kept connection is ahead of its sibling, so the first new
    # connection goes to the other worker and both answer, whatever order the
    # kernel wakes them in.
    with _client() as fresh, httpx.Client(timeout=10) as kept:
        for round_number in range(12):
            client = fresh if round_number % 2 else kept
            for key_id, key, body in (
                ("alice", alice, SETOSA),
                ("alice", alice, {"sepal_length": "x"}),
                ("bob", bob, SETOSA),
                (None, wrong, SETOSA),
            ):
                header = (
                    {"Authorization": f"Bearer {key}"} if round_number % 2 else {"X-API-Key": key}
                )
                response = client.post(f"{server.url}/predict", json=body, headers=header)
                if key_id is not None:
                    sent[(key_id, str(response.status_code))] += 1
                else:
                    assert response.status_code == 401
        scrapes = [scrape(fresh, server.url) for _ in range(2 * WORKERS)]
    assert sent == {("alice", "200"): 12, ("alice", "422"): 12, ("bob", "200"): 12}
    answered_by = {line["worker_pid"] for line in server.access_log() if line["path"] == "/predict"}
    assert len(answered_by) >= 2, "one worker answered everything; the test proves nothing"
    for samples in scrapes:
        for (key_id, status), count in sent.items():
            assert sample(samples, "api_key_requests_total", key_id=key_id, status=status) == count
    logs = server.stdout() + server.stderr()
    assert '"key_id":"alice"' in logs
    for key in keys.minted.values():
        assert key not in logs


def test_startup_says_whether_auth_is_on(server: Gunicorn, keys: Keys) -> None:
    lines = [line for line in server.stderr().splitlines() if '"msg":"auth enabled' in line]
    assert len(lines) == WORKERS  # one line per worker, naming ids only
    assert all('"key_ids":["alice","bob"]' in line for line in lines)
    assert httpx.get(f"{server.url}/health").json()["auth"] == "enabled"


# ------------------------------------------------------------ behind nginx ---

needs_njs = pytest.mark.skipif(
    not NJS_MODULE.exists(), reason="nginx's njs module: run tests/support/install-system-deps.sh"
)
BURST = 3
LIMITS = {
    # Per minute: nothing refills during the test, so exactly 1 + burst pass.
    "PROXY_API_KEY_RATE": "1r/m",
    "PROXY_API_KEY_BURST": str(BURST),
    "PROXY_UNAUTHENTICATED_RATE": "1r/m",
    "PROXY_UNAUTHENTICATED_BURST": str(BURST),
    "PROXY_OPEN_RATE": "1r/m",
    "PROXY_OPEN_BURST": str(BURST),
}


def _statuses(client: httpx.Client, url: str, headers: dict[str, str], count: int) -> list[int]:
    return [
        client.post(f"{url}/predict", json=SETOSA, headers=headers).status_code
        for _ in range(count)
    ]


@needs_njs
def test_nginx_limits_each_key_on_its_own_and_bad_keys_per_address(
    server: Gunicorn, keys: Keys, tmp_path: Path
) -> None:
    settings = {**LIMITS, "API_KEYS_FILE": str(keys.path)}
    alice = {"Authorization": f"Bearer {keys.minted['alice']}"}
    bob = {"X-API-Key": keys.minted["bob"]}
    with running_nginx(tmp_path / "nginx", server.port, settings) as proxy, _client() as client:
        assert _statuses(client, proxy.url, alice, BURST + 1) == [200] * (BURST + 1)
        limited = client.post(f"{proxy.url}/predict", json=SETOSA, headers=alice)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1"
        assert set(limited.json()) == {"detail", "request_id"}
        # Same address, other key: its own bucket, untouched by alice's.
        assert _statuses(client, proxy.url, bob, BURST + 1) == [200] * (BURST + 1)

        # Without a valid key: the service refuses (401) until the small
        # per-address limit stops the flood at the proxy.
        wrong = {"X-API-Key": keyfile.mint_key()}
        flood = _statuses(client, proxy.url, wrong, BURST + 3)
        assert flood == [401] * (BURST + 1) + [429] * 2
        assert client.get(f"{proxy.url}/health").status_code == 429  # same address bucket
        # Keys keep their own buckets: carol, new, is served at once.
        carol = keys.add("carol")
        _accepted_by_every_worker(server, client, carol)
        assert _statuses(client, proxy.url, {"X-API-Key": carol}, 1) == [200]
    proxy_logs = proxy.access_log.read_text() + proxy.error_log.read_text()
    assert '"key_id":"alice"' in proxy_logs
    for key in keys.minted.values():
        assert key not in proxy_logs


@needs_njs
def test_nginx_with_auth_off_limits_per_address(model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "api-keys"
    empty.write_text("")
    env = {"API_KEYS_FILE": str(empty), "AUTH": "off"}
    with (
        running_gunicorn(model_dir, tmp_path / "logs", workers=1, env=env) as server,
        running_nginx(tmp_path / "nginx", server.port, {**LIMITS, **env}) as proxy,
        _client() as client,
    ):
        assert _statuses(client, proxy.url, {}, BURST + 2) == [200] * (BURST + 1) + [429]
