"""The keys follower (service.auth.key_sync) keeps going through a copy it
cannot write: the readers keep the copy they have, and the next write that
can be made is made."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.auth import key_sync, keyfile


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
