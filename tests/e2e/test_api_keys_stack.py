"""Container tier: API keys through the compose stack. The keys file is the
`api-keys` secret, mounted read-only into the api and the proxy; keys added
and revoked on the host reach both while they run; nginx limits each key on
its own (429 with Retry-After)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from service.auth import keyfile
from tests.e2e.support import API_KEYS_FILE, E2E_KEY_BURST, SETOSA, Stack, http

# The bound for a key change to reach every worker of every replica.
LIVE_WITHIN_SECONDS = 5.0


def _auth(stack: Stack) -> str | None:
    try:
        answer = http("GET", f"{stack.proxy}/health", timeout=5)
    except OSError:
        return None
    return str(answer.json().get("auth")) if answer.status == 200 else None


def _settle(stack: Stack, auth: str) -> None:
    deadline = time.monotonic() + 30
    while _auth(stack) != auth:
        assert time.monotonic() < deadline, f"/health never said auth {auth}"
        time.sleep(0.5)
    # One worker has it; the others within the bound.
    time.sleep(LIVE_WITHIN_SECONDS)


def _recreate(stack: Stack, auth: str) -> None:
    """The api and the proxy again, with AUTH as given: it is decided at start."""
    stack.env["AUTH"] = auth
    stack.compose("up", "-d", "--wait", "api", "proxy")


@pytest.fixture
def keys(stack: Stack) -> Iterator[dict[str, str]]:
    minted = {}
    for key_id in ("e2e-alice", "e2e-bob"):
        key = keyfile.mint_key()
        keyfile.update(API_KEYS_FILE, add=keyfile.StoredKey(key_id, keyfile.digest_of(key)))
        minted[key_id] = key
    _recreate(stack, "keys")
    _settle(stack, "enabled")
    try:
        yield minted
    finally:
        for key_id in minted:
            keyfile.update(API_KEYS_FILE, revoke=key_id)
        _recreate(stack, "off")
        _settle(stack, "disabled")


def test_keys_secret_is_mounted_read_only(stack: Stack) -> None:
    for service in ("api", "proxy"):
        for container in stack.containers(service):
            mounts = {m["Destination"]: m for m in stack.inspect(container)["Mounts"]}
            secret = mounts["/run/secrets/api-keys"]
            assert secret["RW"] is False, (service, secret)


def test_proxy_limits_each_key_on_its_own(stack: Stack, keys: dict[str, str]) -> None:
    alice = {"Authorization": f"Bearer {keys['e2e-alice']}"}
    bob = {"X-API-Key": keys["e2e-bob"]}
    assert stack.predict().status == 401  # no key: the API refuses
    served = [stack.predict(headers=alice).status for _ in range(E2E_KEY_BURST + 1)]
    assert served == [200] * (E2E_KEY_BURST + 1)
    limited = stack.predict(headers=alice)
    assert limited.status == 429
    assert limited.headers["retry-after"] == "1"
    assert set(limited.json()) == {"detail", "request_id"}
    # Same client address, another key: its own bucket.
    assert stack.predict(headers=bob).status == 200
    assert http("POST", f"{stack.proxy}/predict", SETOSA, headers=bob).status == 200
    logs = stack.compose("logs", "--no-color", "api", "proxy").stdout
    assert "e2e-alice" in logs
    for key in keys.values():
        assert key not in logs
