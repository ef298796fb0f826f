"""The keys follower (service.auth.key_sync) keeps going through a copy it
cannot write, an answer cut short or anything unforeseen: the readers keep
the copy they have, the next write that can be made is made, and the copy
is stamped as followed meanwhile. A worker's key ring (KeyStore) counts a
copy whose stamp is stale as unfollowed: the worker is then not ready."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.auth import follower_heartbeat, key_sync, keyfile
from service.auth.middleware import KeyStore
from service.logs import APP_LOGGER


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    keys_file = tmp_path / "served" / "api-keys"
    keyfile.update(keys_file, add=keyfile.StoredKey("alice", keyfile.digest_of(keyfile.mint_key())))
    server = key_sync._KeysServer(("127.0.0.1", 0), keys_file, None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{key_sync.KEYS_PATH}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_copy_that_cannot_be_written_is_a_failed_sync_not_the_end_of_the_follower(
    served: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "not-yet" / "api-keys"
    follower = key_sync.Follower(served, copy)
    assert follower.sync() is False
    assert f"cannot write {copy}" in capsys.readouterr().err
    copy.parent.mkdir()
    assert follower.sync() is True
    assert [key.key_id for key in keyfile.read(copy)] == ["alice"]


@pytest.fixture
def cut_short() -> Iterator[str]:
    """A keys service that stops in the middle of its answer."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_half() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 400\r\n\r\n# ml-api keys\n")

    threading.Thread(target=answer_half, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}{key_sync.KEYS_PATH}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        listener.close()


def test_an_answer_cut_short_is_a_failed_sync_not_the_end_of_the_follower(
    cut_short: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # http.client.IncompleteRead is no OSError: it used to end the follower.
    copy = tmp_path / "api-keys"
    assert key_sync.Follower(cut_short, copy).sync() is False
    assert "IncompleteRead" in capsys.readouterr().err
    assert not copy.exists()


def test_an_unforeseen_error_is_a_failed_attempt_and_the_stamp_still_written(
    served: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "api-keys"
    follower = key_sync.Follower(served, copy)

    def unforeseen() -> bool:
        raise RuntimeError("something nobody listed")

    monkeypatch.setattr(follower, "sync", unforeseen)
    follower.attempt()
    assert "unexpected RuntimeError: something nobody listed" in capsys.readouterr().err
    follower.stamp()
    assert follower_heartbeat.seconds_since_touch(copy, since_missing=0.0) < 5


def _backdate_stamp(copy: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(follower_heartbeat.stamp_path(copy), (then, then))


def test_an_attempt_that_never_ends_stops_the_stamp_until_one_does(
    served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "api-keys"
    follower = key_sync.Follower(served, copy)
    monkeypatch.setattr(follower_heartbeat, "ATTEMPT_HUNG_SECONDS", 0.2)
    entered, release = threading.Event(), threading.Event()

    def hangs() -> bool:
        entered.set()
        return release.wait(30)

    monkeypatch.setattr(follower, "sync", hangs)
    attempt = threading.Thread(target=follower.attempt)
    attempt.start()
    assert entered.wait(30)
    time.sleep(0.3)  # past ATTEMPT_HUNG_SECONDS
    follower.stamp_unless_hung()
    assert not follower_heartbeat.stamp_path(copy).exists()
    release.set()
    attempt.join(30)
    follower.stamp_unless_hung()
    assert follower_heartbeat.stamp_path(copy).exists()


@pytest.fixture
def app_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the app's logger, which an app made earlier in the session
    (service.logs) stops propagating."""
    monkeypatch.setattr(logging.getLogger(APP_LOGGER), "propagate", True)
    with caplog.at_level(logging.INFO, logger=APP_LOGGER):
        yield caplog


def test_a_copy_whose_follower_stopped_stamping_makes_the_worker_unready(
    served: str, tmp_path: Path, app_log: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "api-keys"
    follower = key_sync.Follower(served, copy)
    follower.attempt()
    follower.stamp()
    store = KeyStore(copy, followed_every=1.0)
    store.load()
    assert store.unfollowed_reason() is None
    stale = follower_heartbeat.stale_after(1.0)
    _backdate_stamp(copy, stale - 2)
    assert store.unfollowed_reason() is None
    _backdate_stamp(copy, stale + 2)
    reason = store.unfollowed_reason()
    assert reason is not None
    assert reason.startswith("API keys copy not refreshed for 1")  # ~stale + 2 s
    assert store.unfollowed_reason() == reason
    follower.stamp()  # a follower again: ready again
    assert store.unfollowed_reason() is None
    messages = [record.getMessage() for record in app_log.records]
    # Said once per change, not on every probe.
    assert messages.count("API keys copy no longer followed: not ready") == 1
    assert messages.count("API keys copy followed again") == 1


def test_no_stamp_yet_is_not_stale_until_a_follower_had_its_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "api-keys"
    store = KeyStore(copy, followed_every=1.0)
    assert store.unfollowed_reason() is None  # the master's follower still starting
    later = time.time() + follower_heartbeat.stale_after(1.0) + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert store.unfollowed_reason() is not None  # none ever came


def test_a_file_that_is_not_a_copy_has_no_follower_to_lose(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "api-keys")
    assert store.unfollowed_reason() is None
    assert (
        KeyStore(tmp_path / "api-keys", required=False, followed_every=1.0).unfollowed_reason()
        is None
    )
