"""The API keys file, the key-management CLI and `make api-key`, and the key
store's re-reading."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from service.auth import keyfile
from service.auth import middleware as auth
from service.routes.public import OpenPaths
from tests.support.bundles import REPO


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.auth.keys", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def test_minted_keys_carry_at_least_128_random_bits() -> None:
    keys = {keyfile.mint_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith(keyfile.KEY_PREFIX)
        # url-safe base64: 6 bits a character.
        assert (len(key) - len(keyfile.KEY_PREFIX)) * 6 >= 128


def test_make_api_key_prints_the_key_last_and_stores_only_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "api-keys"
    out = subprocess.run(
        ["make", "--no-print-directory", "api-key", "NAME=alice", f"API_KEYS_FILE={path}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=True,
    ).stdout
    key = out.strip().splitlines()[-1]
    assert key.startswith(keyfile.KEY_PREFIX)
    stored = path.read_text()
    assert key not in stored
    assert f"alice {hashlib.sha256(key.encode()).hexdigest()}\n" in stored
    assert keyfile.read(path) == (keyfile.StoredKey("alice", keyfile.digest_of(key)),)
    # Private: the file and the directory the tool made for it.
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_stdout_of_add_is_the_key_alone(tmp_path: Path) -> None:
    added = _cli("--file", str(tmp_path / "keys"), "add", "svc-1")
    assert added.returncode == 0
    assert added.stdout.count("\n") == 1
    assert added.stdout.strip().startswith(keyfile.KEY_PREFIX)
    assert added.stdout.strip() not in added.stderr


def test_revoke_removes_one_key_and_keeps_the_file_in_place(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    for name in ("a", "b", "c"):
        assert _cli("--file", str(path), "add", name).returncode == 0
    inode = path.stat().st_ino
    assert _cli("--file", str(path), "revoke", "b").returncode == 0
    assert [key.key_id for key in keyfile.read(path)] == ["a", "c"]
    # In place: a Docker secret is bind-mounted by inode.
    assert path.stat().st_ino == inode
    assert _cli("--file", str(path), "list").stdout.split() == ["a", "c"]


def test_cli_refusals_say_why(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    assert _cli("--file", str(path), "add", "only").returncode == 0
    duplicate = _cli("--file", str(path), "add", "only")
    assert (duplicate.returncode, "exists" in duplicate.stderr) == (1, True)
    bad_id = _cli("--file", str(path), "add", "no spaces allowed")
    assert (bad_id.returncode, "key id" in bad_id.stderr) == (1, True)
    unknown = _cli("--file", str(path), "revoke", "nobody")
    assert (unknown.returncode, "no key with id" in unknown.stderr) == (1, True)
    last = _cli("--file", str(path), "revoke", "only")
    assert (last.returncode, "refuses every request" in last.stderr) == (1, True)
    # Running open is configuration (AUTH=off), not something the file says.
    open_flag = _cli("--file", str(path), "revoke", "only", "--allow-open")
    assert (open_flag.returncode, "AUTH=off" in open_flag.stderr) == (1, True)
    assert _cli("--file", str(path), "revoke", "only", "--allow-empty").returncode == 0
    assert keyfile.read(path) == ()
    # What is left is a complete file with no key: it means "refuse everyone".
    assert keyfile.read_complete(path) == ((), True)


def test_cli_imports_nothing_heavy() -> None:
    probe = (
        "import sys, service.auth.keys; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'pydantic', 'numpy', 'fastapi', 'starlette', 'onnxruntime', 'prometheus_client'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("alice\n", "expected"),
        ("alice " + "0" * 63 + "\n", "digest"),
        ("alice " + "G" * 64 + "\n", "digest"),
        ("al ice " + "0" * 64 + "\n", "expected"),
        (f"alice {'0' * 64}\nalice {'1' * 64}\n", "twice"),
    ],
)
def test_malformed_files_are_refused_naming_the_line(text: str, reason: str) -> None:
    with pytest.raises(keyfile.KeyFileError, match=reason):
        keyfile.parse(text)


def test_a_rewrite_within_one_timestamp_tick_is_still_picked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same inode, same size, same mtime: only the "recently modified" rule
    # makes the store read the file again.
    monkeypatch.setattr(auth, "CHECK_INTERVAL_SECONDS", 0.0)
    path = tmp_path / "keys"
    first, second = b"k" * 20, b"j" * 20
    path.write_text(keyfile.render((keyfile.StoredKey("alice", keyfile.digest_of(first)),)))
    before = path.stat()
    store = auth.KeyStore(path)
    store.load()
    assert store.authenticate(first) == "alice"
    with path.open("r+") as handle:
        handle.write(keyfile.render((keyfile.StoredKey("alice", keyfile.digest_of(second)),)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    store.refresh()
    assert store.authenticate(second) == "alice"
    assert store.authenticate(first) is None


def test_presented_key_rules() -> None:
    assert auth.presented_key([(b"authorization", b"Bearer abc")]) == (b"abc", "")
    assert auth.presented_key([(b"authorization", b"  bearer   abc ")]) == (b"abc", "")
    assert auth.presented_key([(b"x-api-key", b"abc")]) == (b"abc", "")
    both = [(b"authorization", b"Bearer abc"), (b"x-api-key", b"xyz")]
    assert auth.presented_key(both) == (b"abc", "")
    basic = [(b"authorization", b"Basic Zm9v"), (b"x-api-key", b"xyz")]
    assert auth.presented_key(basic) == (b"xyz", "")
    assert auth.presented_key([]) == (None, auth.MISSING)
    assert auth.presented_key([(b"authorization", b"Basic Zm9v")]) == (
        None,
        auth.MALFORMED_AUTHORIZATION,
    )
    assert auth.presented_key([(b"x-api-key", b"")]) == (None, auth.MALFORMED_API_KEY)


def _general_rule(authorization: bytes) -> tuple[bytes | None, str]:
    # presented_key's rule for an Authorization header alone, without its shortcut.
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() == b"bearer":
        return (token, "") if token and b" " not in token else (None, auth.MALFORMED_AUTHORIZATION)
    return None, auth.MALFORMED_AUTHORIZATION


def test_the_bearer_shortcut_answers_as_the_general_rule_does() -> None:
    pieces = [b"", b" ", b"  ", b"\t", b"abc", b"a b", b"a\tb", b"\xff", b"Bearer", b"bearer"]
    headers = [
        b"Bearer " + a + b + c for a in pieces for b in pieces for c in (b"", b" ", b"\t", b"x")
    ] + [b"BEARER abc", b"Bearer", b"Bearer ", b" Bearer abc", b"Bearerabc"]
    for header in headers:
        assert auth.presented_key([(b"authorization", header)]) == _general_rule(header), header


def _alice_and_bob(tmp_path: Path) -> tuple[auth.KeyStore, Path, bytes, bytes]:
    path = tmp_path / "keys"
    alice, bob = b"a" * 30, b"b" * 30
    keyfile.update(path, add=keyfile.StoredKey("alice", keyfile.digest_of(alice)))
    keyfile.update(path, add=keyfile.StoredKey("bob", keyfile.digest_of(bob)))
    store = auth.KeyStore(path)
    store.load()
    return store, path, alice, bob


def test_a_revoked_key_stops_working_although_it_was_valid_a_moment_ago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "CHECK_INTERVAL_SECONDS", 0.0)
    store, path, alice, bob = _alice_and_bob(tmp_path)
    for _ in range(3):  # valid keys are remembered after the first check
        assert store.authenticate(alice) == "alice"
        assert store.authenticate(bob) == "bob"
    assert store.authenticate(b"c" * 30) is None
    keyfile.update(path, revoke="alice")
    store.refresh()
    assert store.authenticate(alice) is None
    assert store.authenticate(bob) == "bob"


def _key_id_through_the_middleware(
    middleware: auth.ApiKeyMiddleware, headers: list[tuple[bytes, bytes]]
) -> str | None:
    scope: dict[str, Any] = {"type": "http", "path": "/predict", "headers": headers, "state": {}}
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    awaitable = middleware(scope, None, send)  # type: ignore[arg-type]
    with contextlib.suppress(StopIteration):
        awaitable.send(None)  # type: ignore[attr-defined]
    key_id: str | None = scope["state"].get("key_id")
    assert (key_id is None) == bool(sent)  # refused with an answer, or let through
    return key_id


def test_a_remembered_authorization_header_names_its_key_until_the_keys_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, path, alice, bob = _alice_and_bob(tmp_path)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    middleware = auth.ApiKeyMiddleware(app, store, OpenPaths(["/health"]))
    bearer = [(b"authorization", b"Bearer " + alice)]
    for _ in range(3):
        assert _key_id_through_the_middleware(middleware, bearer) == "alice"
        # Bearer wins over X-API-Key, remembered or not.
        assert _key_id_through_the_middleware(middleware, [*bearer, (b"x-api-key", bob)]) == "alice"
        # Other spellings of the same key are checked by the general rule each time.
        lower = [(b"authorization", b"bearer  " + alice)]
        assert _key_id_through_the_middleware(middleware, lower) == "alice"
    assert list(store.valid_authorizations) == [b"Bearer " + alice]
    assert _key_id_through_the_middleware(middleware, [(b"x-api-key", bob)]) == "bob"
    assert list(store.valid_authorizations) == [b"Bearer " + alice]
    keyfile.update(path, revoke="alice")
    # The next request after the check interval sees the new file.
    later = time.monotonic() + 2 * auth.CHECK_INTERVAL_SECONDS
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert _key_id_through_the_middleware(middleware, bearer) is None
    assert store.valid_authorizations == {}
    assert _key_id_through_the_middleware(middleware, [(b"x-api-key", bob)]) == "bob"


ALICE = keyfile.StoredKey("alice", keyfile.digest_of(b"a" * 30))
MARKED = keyfile.render((ALICE,))
HAND_WRITTEN = f"alice {ALICE.digest.hex()}\n"


@pytest.mark.parametrize(
    ("content", "require_marker"),
    [
        (None, False),  # removed
        ("", False),  # emptied: cp's truncate, before its write
        ("# only comments\n\n", False),
        (keyfile.HEADER, False),  # the tool's file, cut before the marker
        (MARKED[: MARKED.index("alice") + 10], False),  # cut inside a line
        (HAND_WRITTEN, True),  # a tool-written file that lost its marker
        (MARKED + MARKED[len(keyfile.HEADER) :], False),  # the tool's write before its cut
    ],
)
def test_a_file_that_may_be_a_write_in_progress_is_incomplete(
    tmp_path: Path, content: str | None, require_marker: bool
) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(keyfile.KeyFileError):
        keyfile.read_complete(path, require_marker=require_marker)


def test_complete_files_are_the_marked_ones_and_hand_written_ones_with_keys(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys"
    path.write_text(MARKED)
    assert keyfile.read_complete(path) == ((ALICE,), True)
    path.write_text(keyfile.render(()))
    assert keyfile.read_complete(path) == ((), True)
    path.write_text(HAND_WRITTEN)
    assert keyfile.read_complete(path) == ((ALICE,), False)


@pytest.mark.parametrize(
    "break_file",
    [
        lambda path: path.unlink(),
        lambda path: path.write_text(""),
        lambda path: path.write_text("# comments only\n"),
        lambda path: path.write_text(MARKED[:-5]),
        lambda path: path.write_text("alice not-a-digest\n"),
        lambda path: path.write_bytes(b"\xff\xfe"),
    ],
    ids=["removed", "emptied", "comments", "truncated", "unparsable", "not-utf8"],
)
def test_a_broken_file_keeps_the_keys_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, break_file: Any
) -> None:
    monkeypatch.setattr(auth, "CHECK_INTERVAL_SECONDS", 0.0)
    path = tmp_path / "keys"
    path.write_text(MARKED)
    states: list[bool] = []
    store = auth.KeyStore(path, required=True, on_file_state=states.append)
    store.load()
    break_file(path)
    store.refresh()
    assert (store.enabled, store.key_ids, store.file_ok) == (True, ["alice"], False)
    assert store.authenticate(b"a" * 30) == "alice"
    path.write_text(MARKED)
    store.refresh()
    assert states == [True, False, True]


def test_revoking_the_last_key_refuses_everyone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "CHECK_INTERVAL_SECONDS", 0.0)
    path = tmp_path / "keys"
    keyfile.update(path, add=ALICE)
    store = auth.KeyStore(path, required=True)
    store.load()
    keyfile.update(path, revoke="alice")
    store.refresh()
    assert (store.enabled, store.key_ids, store.file_ok) == (True, [], True)
    assert store.authenticate(b"a" * 30) is None


def test_with_auth_off_the_file_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "CHECK_INTERVAL_SECONDS", 0.0)
    path = tmp_path / "keys"
    store = auth.KeyStore(path, required=False)
    store.load()
    keyfile.update(path, add=ALICE)
    store.refresh()
    assert (store.enabled, store.key_ids) == (False, [])


@pytest.mark.parametrize(
    ("environment", "file_exists", "mode"),
    [
        ({}, False, "off"),
        ({}, True, "keys"),
        ({"API_KEYS_FILE": "elsewhere"}, False, "keys"),
        ({"API_KEYS_FILE": "elsewhere", "AUTH": "off"}, False, "off"),
        ({"AUTH": "keys"}, False, "keys"),
        ({"AUTH": ""}, False, "off"),
    ],
)
def test_auth_is_decided_from_configuration(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    file_exists: bool,
    mode: str,
) -> None:
    from service.settings import ServerSettings, ServiceSettings

    monkeypatch.chdir(tmp_path)
    if file_exists:
        keyfile.update(keyfile.DEFAULT_KEYS_FILE)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert ServiceSettings().auth_mode == ServerSettings().auth_mode == mode
