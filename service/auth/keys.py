"""`python -m service.auth.keys add|revoke|list`: manage the API keys file.

`add` prints the new key once, as the last line of its output (on stdout;
everything else goes to stderr, so `KEY=$(python -m service.auth.keys add NAME)`
captures the key alone). Running servers pick changes up within seconds.
Standard library only: no virtualenv needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.auth import keyfile


def _add(path: Path, key_id: str) -> int:
    if not keyfile.KEY_ID_RE.fullmatch(key_id):
        raise keyfile.KeyFileError(
            f"key id {key_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    key = keyfile.mint_key()
    keyfile.update(path, add=keyfile.StoredKey(key_id, keyfile.digest_of(key)))
    print(
        f"added API key {key_id!r} to {path} ({WHERE_LIVE}). It is shown only once;"
        " send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>':",
        file=sys.stderr,
    )
    sys.stderr.flush()
    print(key, flush=True)
    return 0


# Where the change is live, and when: the file is read in place by make serve
# and compose; a Swarm stack serves its own copy (a secret) until stack-keys.
WHERE_LIVE = (
    "servers reading this file (make serve, make up) take it within 5 s;"
    " a Swarm stack takes it with `make stack-keys`, which returns once it is live"
)

OPEN_IS_CONFIGURATION = (
    "the keys file no longer decides whether the service runs open: set AUTH=off"
    " in the service's environment for that"
)


def _revoke(path: Path, key_id: str, allow_empty: bool) -> int:
    keys = keyfile.read(path)
    if [key.key_id for key in keys] == [key_id] and not allow_empty:
        raise keyfile.KeyFileError(
            f"{key_id!r} is the last key in {path}: without keys the service refuses"
            " every request but health. Add another key first, or pass --allow-empty"
            f" ({OPEN_IS_CONFIGURATION})"
        )
    keyfile.update(path, revoke=key_id)
    print(f"revoked API key {key_id!r} in {path} ({WHERE_LIVE})", file=sys.stderr)
    return 0


def _list(path: Path) -> int:
    for key in keyfile.read(path):
        print(key.key_id)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.auth.keys", description=__doc__)
    parser.add_argument(
        "--file",
        type=Path,
        default=keyfile.DEFAULT_KEYS_FILE,
        help=f"the keys file (API_KEYS_FILE; default {keyfile.DEFAULT_KEYS_FILE})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("add", help="mint a key and print it once").add_argument("key_id")
    revoke = commands.add_parser("revoke", help="remove a key")
    revoke.add_argument("key_id")
    revoke.add_argument(
        "--allow-empty",
        action="store_true",
        help="allow revoking the last key (the service then refuses every request)",
    )
    revoke.add_argument("--allow-open", action="store_true", help=argparse.SUPPRESS)
    commands.add_parser("list", help="the key ids")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            return _add(args.file, args.key_id)
        if args.command == "revoke":
            if args.allow_open:
                raise keyfile.KeyFileError(f"--allow-open: {OPEN_IS_CONFIGURATION}")
            return _revoke(args.file, args.key_id, args.allow_empty)
        return _list(args.file)
    except (keyfile.KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
