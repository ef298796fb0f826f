"""The API keys file: one `<key id> <SHA-256 hex of the key>` per line.

The file holds digests only. A key is 256 random bits from `secrets`, so its
digest cannot be turned back into it; the file is still mounted as a secret,
read-only. Standard library only: `python -m service.auth.keys` runs without the
virtualenv, and nginx's njs script (docker/nginx/api_keys.js) reads the same
format.

Updates rewrite the file in place under an exclusive lock instead of renaming
a new file over it: Docker bind-mounts a single-file secret by inode, and a
rename would leave every running container on the old file.

A file the key tool writes ends with END_MARKER. A reader cannot tell an empty
or half-written file (`cp` truncates, then writes) from one that means "no
keys"; the marker can: without it, a file that holds no key is incomplete,
never an instruction to run open (see `read_complete`).
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
END_MARKER = "# end of ml-api API keys\n"
# A reader compares two reads of the file; a writer still at it makes them differ.
STABLE_READ_ATTEMPTS = 5
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


class KeyFileError(ValueError):
    """The keys file cannot be used as it is; the message says which line and why."""


class IncompleteKeyFileError(KeyFileError):
    """Missing, empty, comment-only without the end marker, or changing while read:
    possibly a write in progress, never a file that means "no keys"."""


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
    return HEADER + "".join(f"{key.key_id} {key.digest.hex()}\n" for key in keys) + END_MARKER


def read(path: Path) -> tuple[StoredKey, ...]:
    """The keys in the file, for the key tool; no file at all means none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    return parse(text, str(path))


def stable_text(path: Path) -> str:
    """The file's content as two consecutive reads agree on it."""
    try:
        previous = path.read_bytes()
        for _ in range(STABLE_READ_ATTEMPTS):
            current = path.read_bytes()
            if current == previous:
                return current.decode("utf-8")
            previous = current
    except FileNotFoundError:
        raise IncompleteKeyFileError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    raise IncompleteKeyFileError(f"{path}: changed on every one of {STABLE_READ_ATTEMPTS} reads")


def read_complete(path: Path, require_marker: bool = False) -> tuple[tuple[StoredKey, ...], bool]:
    """The keys of a complete file and whether it carries the end marker.

    Raises IncompleteKeyFileError for a file that may be a write in progress:
    missing, holding no key without the end marker, or (`require_marker`: it
    carried one before) without the marker; KeyFileError for one that cannot
    be parsed.
    """
    return complete_keys(stable_text(path), str(path), require_marker)


def complete_keys(
    text: str, source: str, require_marker: bool = False
) -> tuple[tuple[StoredKey, ...], bool]:
    """read_complete's rules for a keys file's text from anywhere (`source`
    names it in errors): a file, or the keys service (service.auth.key_sync)."""
    marked = text.endswith(END_MARKER)
    if text.count(END_MARKER.strip()) > int(marked):
        # Also what a reader sees between the key tool's write and its cut.
        raise IncompleteKeyFileError(f"{source}: text after the end marker")
    keys = parse(text, source)
    if not marked and (require_marker or not keys):
        what = "no end marker" if keys else "no key and no end marker (empty or cut short)"
        raise IncompleteKeyFileError(f"{source}: {what}")
    return keys, marked


def update(path: Path, add: StoredKey | None = None, revoke: str | None = None) -> None:
    """Add one key or revoke one, in place, under an exclusive lock.

    The new content is written over the old from offset 0 and the file is
    then cut to length, so a reader never sees an empty file: it sees the old
    content, the new one, or a mixture the parser refuses (the service then
    keeps the keys it had and reads again a moment later).
    """
    if not path.parent.exists():
        path.parent.mkdir(mode=DIRECTORY_MODE, parents=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    try:
        if created:
            # Private whatever the umask. A file the service reads as another
            # user (compose bind-mounts it) is made readable there, on purpose
            # (docker/targets.mk): digests reveal no key.
            os.fchmod(fd, FILE_MODE)
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
