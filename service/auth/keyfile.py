"""The API keys file: one `<key id> <SHA-256 hex of the key>` per line.

The file holds digests only. A key is 256 random bits from `secrets`, so its
digest cannot be turned back into it; the file is still mounted as a secret,
read-only. Standard library only: `python -m service.auth.keys` runs without the
virtualenv, and nginx's njs script (docker/nginx/api_keys.js) reads the same
format.

Updates rewrite the file in place under an exclusive lock instead of renaming
a new file over it: Docker bind-mounts a single-file secret by inode, and a
rename would leave every running container on the old file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KEYS_FILE = Path("secrets/api-keys")
KEY_PREFIX = "mlapi_"
KEY_BYTES = 32
# Ids become metric label values, nginx zone keys and log fields: short and inert.
KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
HEADER = (
    "# ml-api API keys: one '<key id> <sha256 hex of the key>' per line.\n"
    "# Managed by `make api-key NAME=<id>` and `make api-key-revoke NAME=<id>`.\n"
    "# Keys are never stored, only their digests.\n"
)


class KeyFileError(ValueError):
    """The keys file cannot be used as it is; the message says which line and why."""


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    digest: bytes  # raw SHA-256 of the key


def digest_of(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def mint_key() -> str:
    # The prefix lets secret scanners and people recognise a leaked key.
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def parse(text: str, source: str = "keys file") -> tuple[StoredKey, ...]:
    keys: list[StoredKey] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or not KEY_ID_RE.fullmatch(fields[0]):
            raise KeyFileError(f"{source} line {number}: expected '<key id> <sha256 hex>'")
        key_id, digest = fields
        if not _DIGEST_RE.fullmatch(digest):
            raise KeyFileError(f"{source} line {number}: {key_id!r} has no 64-hex-digit digest")
        if key_id in seen:
            raise KeyFileError(f"{source} line {number}: key id {key_id!r} appears twice")
        seen.add(key_id)
        keys.append(StoredKey(key_id, bytes.fromhex(digest)))
    return tuple(keys)


def render(keys: tuple[StoredKey, ...]) -> str:
    return HEADER + "".join(f"{key.key_id} {key.digest.hex()}\n" for key in keys)


def read(path: Path) -> tuple[StoredKey, ...]:
    """The keys in the file; no file at all means none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    return parse(text, str(path))


def update(path: Path, add: StoredKey | None = None, revoke: str | None = None) -> None:
    """Add one key or revoke one, in place, under an exclusive lock.

    The new content is written over the old from offset 0 and the file is
    then cut to length, so a reader never sees an empty file: it sees the old
    content, the new one, or a mixture the parser refuses (the service then
    keeps the keys it had and reads again a moment later).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if created:
            # Readable by the service and nginx, which run as other users (in
            # containers, through a bind mount), whatever the umask: digests
            # reveal no key.
            os.fchmod(fd, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "rb") as current:
            keys = parse(current.read().decode("utf-8"), str(path))
        if add is not None:
            if any(key.key_id == add.key_id for key in keys):
                raise KeyFileError(
                    f"key id {add.key_id!r} exists already in {path}; revoke it first"
                )
            keys = (*keys, add)
        if revoke is not None:
            remaining = tuple(key for key in keys if key.key_id != revoke)
            if len(remaining) == len(keys):
                raise KeyFileError(f"no key with id {revoke!r} in {path}")
            keys = remaining
        content = render(keys).encode()
        written = 0
        while written < len(content):
            written += os.pwrite(fd, content[written:], written)
        os.ftruncate(fd, len(content))
        os.fsync(fd)
    finally:
        os.close(fd)
