"""Keys that change without restarting anything, as on the Swarm stack: a real
keys service (`python -m service.auth.key_sync serve`) holds the keys file,
and a real two-worker Gunicorn with `API_KEYS_URL` copies it every second
(the master's follower) into its own `API_KEYS_FILE`. A key added there is
accepted, a revoked one refused, by every worker, without a restart; while
the keys service is gone or serves a cut file, the keys last copied stay.
Keys pushed into the running keys service (what stack.sh keys does before
Swarm replaces its task) win over its file. A follower that ends is
started again; with none at all, the workers are not ready (nothing would
bring a revocation to them)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.auth import follower_heartbeat, keyfile
from tests.support.bundles import REPO, SETOSA
from tests.support.servers import Gunicorn, free_port, running_gunicorn, wait_for

pytestmark = pytest.mark.process

# Enough requests that both workers answer some (new connections each).
REQUESTS = 20


@dataclass
class KeysService:
    keys_file: Path
    pushed_file: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api-keys"

    def start(self) -> None:
        command = [sys.executable, "-m", "service.auth.key_sync", "serve"]
        command += ["--file", str(self.keys_file), "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--pushed", str(self.pushed_file)]
        self.process = subprocess.Popen(command, cwd=REPO)

        def answers() -> bool:
            try:
                return httpx.get(self.url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 20, what="the keys service")

    def push(self, text: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "service.auth.key_sync", "push"]
        command += ["--file", str(self.pushed_file)]
        return subprocess.run(command, cwd=REPO, input=text, capture_output=True, text=True)

    def copies(self, sha256: str) -> subprocess.CompletedProcess[str]:
        """What stack.sh asks the keys tasks, with this service as the one
        keys task and this host's copier (the Gunicorn master's follower)."""
        command = [sys.executable, "-m", "service.auth.key_sync", "copies", "--sha256", sha256]
        command += ["--port", str(self.port), "--keys", "127.0.0.1", "127.0.0.1"]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)


@dataclass
class Followed:
    server: Gunicorn
    service: KeysService

    def statuses(self, key: str) -> set[int]:
        answers = set()
        for _ in range(REQUESTS):
            response = httpx.post(
                f"{self.server.url}/predict", json=SETOSA, headers={"X-API-Key": key}, timeout=10
            )
            answers.add(response.status_code)
        return answers


def _add(keys_file: Path, key_id: str) -> str:
    key = keyfile.mint_key()
    keyfile.update(keys_file, add=keyfile.StoredKey(key_id, keyfile.digest_of(key)))
    return key


@pytest.fixture
def alice_and_followed(model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Followed]]:
    served_file = tmp_path / "keys-service" / "api-keys"
    alice = _add(served_file, "alice")
    (tmp_path / "pushed").mkdir()
    service = KeysService(served_file, tmp_path / "pushed" / "api-keys", free_port())
    service.start()
    env = {
        "API_KEYS_URL": service.url,
        "API_KEYS_FILE": str(tmp_path / "copy" / "api-keys"),
        "API_KEYS_POLL_INTERVAL": "0.5",
    }
    (tmp_path / "copy").mkdir()
    try:
        with running_gunicorn(model_dir, tmp_path / "logs", workers=2, env=env) as server:
            yield alice, Followed(server, service)
    finally:
        service.stop()


def test_keys_added_and_revoked_at_the_url_reach_every_worker_without_a_restart(
    alice_and_followed: tuple[str, Followed],
) -> None:
    alice, followed = alice_and_followed
    served_file = followed.service.keys_file
    workers = followed.server.worker_pids()
    # The first copy was made before the workers started.
    assert followed.statuses(alice) == {200}
    bob = _add(served_file, "bob")
    wait_for(lambda: followed.statuses(bob) == {200}, 15, what="bob accepted by every worker")
    # The keys service can tell which copier holds which file.
    held = hashlib.sha256(served_file.read_bytes()).hexdigest()
    assert followed.service.copies(held).stdout.split("\n")[0] == "held 127.0.0.1 127.0.0.1"
    stale = followed.service.copies(hashlib.sha256(b"an older file").hexdigest())
    assert (stale.returncode, stale.stdout.strip()) == (1, "missing 127.0.0.1 127.0.0.1")
    keyfile.update(served_file, revoke="alice")
    wait_for(lambda: followed.statuses(alice) == {401}, 15, what="alice refused by every worker")
    # The same workers throughout: nothing restarted.
    assert followed.server.worker_pids() == workers


def test_the_copy_keeps_its_keys_while_the_url_fails_or_serves_a_cut_file(
    alice_and_followed: tuple[str, Followed],
) -> None:
    alice, followed = alice_and_followed
    served_file = followed.service.keys_file
    complete = served_file.read_text()
    # A cut file: no end marker, no key. The service refuses to serve it, and
    # the follower says it kept the copy.
    served_file.write_text(keyfile.HEADER)
    assert httpx.get(followed.service.url, timeout=2).status_code == 503
    wait_for(lambda: "answered 503" in followed.server.stderr(), 15, what="the 503 noticed")
    assert followed.statuses(alice) == {200}
    # Gone: connection refused.
    followed.service.stop()
    wait_for(lambda: "Connection refused" in followed.server.stderr(), 15, what="refusal noticed")
    assert followed.statuses(alice) == {200}
    # Back, with a new key.
    served_file.write_text(complete)
    followed.service.start()
    bob = _add(served_file, "bob")
    wait_for(lambda: followed.statuses(bob) == {200}, 15, what="bob accepted once the url is back")
    assert followed.statuses(alice) == {200}


def test_keys_pushed_into_the_running_keys_service_win_over_its_file(
    alice_and_followed: tuple[str, Followed], tmp_path: Path
) -> None:
    alice, followed = alice_and_followed
    rotated = tmp_path / "rotated-api-keys"
    rotated.write_text(followed.service.keys_file.read_text())
    bob = _add(rotated, "bob")
    keyfile.update(rotated, revoke="alice")
    pushed = followed.service.push(rotated.read_text())
    assert pushed.returncode == 0, pushed.stderr
    wait_for(lambda: followed.statuses(bob) == {200}, 15, what="bob accepted by every worker")
    assert followed.statuses(alice) == {401}
    # A cut push is refused whole: the service keeps serving the last push.
    cut = followed.service.push(keyfile.HEADER)
    assert cut.returncode == 1
    assert "API keys not pushed" in cut.stderr
    assert followed.service.pushed_file.read_text() == rotated.read_text()
    # Its own file changing no longer matters while a push stands.
    _add(followed.service.keys_file, "carol")
    served = httpx.get(followed.service.url, timeout=2)
    assert served.text == rotated.read_text()


def _follower_pids(copy: Path) -> set[int]:
    """The `key_sync follow` processes that keep `copy` (a path no other
    test's server uses), found by their command lines."""
    found = set()
    for cmdline_file in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline_file.read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if b"service.auth.key_sync" in argv and b"follow" in argv and os.fsencode(copy) in argv:
            found.add(int(cmdline_file.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _readiness(server: Gunicorn) -> tuple[int, dict[str, str]]:
    answer = httpx.get(f"{server.url}/health/ready", timeout=5)
    return answer.status_code, answer.json()


def _v2_readiness(server: Gunicorn) -> tuple[int, dict[str, bool]]:
    answer = httpx.get(f"{server.url}/v2/health/ready", timeout=5)
    return answer.status_code, answer.json()


def test_a_killed_follower_is_started_again_and_the_copy_stays_followed(
    alice_and_followed: tuple[str, Followed], tmp_path: Path
) -> None:
    alice, followed = alice_and_followed
    copy = tmp_path / "copy" / "api-keys"
    (first,) = _follower_pids(copy)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(_follower_pids(copy) - {first}) == 1, 15, what="a follower started again")
    assert "follower ended; restarting" in followed.server.stderr()
    bob = _add(followed.service.keys_file, "bob")
    wait_for(lambda: followed.statuses(bob) == {200}, 15, what="bob accepted by every worker")
    assert _readiness(followed.server)[0] == 200
    assert followed.statuses(alice) == {200}


def test_workers_whose_keys_copy_nobody_follows_any_more_are_not_ready(
    alice_and_followed: tuple[str, Followed], tmp_path: Path
) -> None:
    """The master's follower gone for good (its restarting loop too): nothing
    brings a revocation to this replica any more, so /health/ready (the
    container's health check) and /v2/health/ready say so, and the
    orchestrator replaces it. The
    stamp's age is moved on rather than waited out
    (follower_heartbeat.stale_after)."""
    alice, followed = alice_and_followed
    copy = tmp_path / "copy" / "api-keys"
    long_ago = time.time() - 3600
    assert _readiness(followed.server)[0] == 200
    assert _v2_readiness(followed.server) == (200, {"ready": True})
    # While the follower runs, an old stamp is renewed.
    os.utime(follower_heartbeat.stamp_path(copy), (long_ago, long_ago))
    wait_for(
        lambda: follower_heartbeat.seconds_since_touch(copy, long_ago) < 60,
        15,
        what="the follower renewing its stamp",
    )
    assert _readiness(followed.server)[0] == 200
    (follower,) = _follower_pids(copy)
    os.killpg(os.getpgid(follower), signal.SIGKILL)
    # Dead, not dying: a touch under way could otherwise land after the next line.
    wait_for(lambda: _gone(follower), 15, what="the follower gone")
    os.utime(follower_heartbeat.stamp_path(copy), (long_ago, long_ago))
    # Over more than a few of the follower's intervals (0.5 s).
    answers = []
    for _ in range(8):
        answers.append(_readiness(followed.server))
        time.sleep(0.25)
    assert {status for status, _ in answers} == {503}, answers
    # An hour and some seconds; the path stays in the server's log.
    expected = "API keys copy not refreshed for 36"
    assert all(body["reason"].startswith(expected) for _, body in answers), answers
    # The Open Inference Protocol's probe follows the same rule (KServe's and
    # Triton's deployments probe it).
    assert _v2_readiness(followed.server) == (503, {"ready": False})
    assert _follower_pids(copy) == set()
    # Alive, and the keys it holds still work: only routing should change.
    assert httpx.get(f"{followed.server.url}/health/live", timeout=5).status_code == 200
    assert followed.statuses(alice) == {200}
    assert "API keys copy no longer followed: not ready" in followed.server.stderr()
