"""API-key authentication: pure ASGI middleware in front of the fast path.

A FastAPI dependency would never run for /predict and /predict/batch (the
fast path answers them before FastAPI is reached), so the check sits in the
middleware stack, after the request id is assigned and before anything reads
the body.

The keys file is re-read when it changes, checked at most once a second and
only when a request arrives, so a key added or revoked is live in every
worker within a second or two without a restart, and a request costs one
clock read plus one SHA-256 and a constant-time comparison with every stored
digest. Whether a key is needed at all is fixed at start (AUTH), never by
the file's content: a file that breaks keeps the keys loaded before.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import follower_heartbeat, keyfile
from service.logs import APP_LOGGER
from service.middleware import send_error

if TYPE_CHECKING:
    from service.routes.public import OpenPaths

log = logging.getLogger(APP_LOGGER)

CHECK_INTERVAL_SECONDS = 1.0
# A file modified this recently may be modified again within the same
# timestamp tick (Linux file times are jiffy-coarse), leaving size and mtime
# unchanged: such a file is read again at the next check ("racy git").
RACY_SECONDS = 2.0

MISSING = "API key required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
MALFORMED_AUTHORIZATION = "malformed Authorization header: expected 'Bearer <key>'"
MALFORMED_API_KEY = "malformed X-API-Key header: expected the key alone"
INVALID = "invalid API key"
CHALLENGE = {"www-authenticate": "Bearer"}

Signature = tuple[int, int, int] | None  # inode, size, mtime in ns; None: no file


class KeyStore:
    """The keys of one file, kept current while the server runs.

    Fails closed: whether keys are required is fixed when the store is made
    (AUTH); a file that goes missing, empty, cut short or unparsable while
    the server runs keeps the keys loaded before, and only a complete file
    (service.auth.keyfile.read_complete) replaces them, even with no key.
    """

    def __init__(
        self,
        path: Path,
        required: bool = True,
        on_file_state: Callable[[bool], None] | None = None,
        followed_every: float | None = None,
    ) -> None:
        """`followed_every`: the file is a copy a follower refreshes at that
        interval (API_KEYS_URL), whose stamp says it still runs."""
        self.path = path
        self.required = required
        self._followed_every = followed_every
        self._created = time.time()
        self._unfollowed = False
        self._keys: tuple[keyfile.StoredKey, ...] = ()
        # Presented keys found valid since the keys last changed -> their ids.
        self._valid: dict[bytes, str] = {}
        # The same for whole `Authorization: Bearer <key>` values: the usual
        # request is recognised from its header, without parsing it.
        self.valid_authorizations: dict[bytes, str] = {}
        self._signature: Signature = None
        self._reread = True
        self._next_check = 0.0
        self._refused: Signature | str = "never"
        # Once the file carried the key tool's end marker, a version without
        # it is a write in progress.
        self._marked = False
        self._on_file_state = on_file_state
        self._file_ok: bool | None = None

    @property
    def enabled(self) -> bool:
        return self.required

    @property
    def key_ids(self) -> list[str]:
        return [key.key_id for key in self._keys]

    def load(self) -> None:
        """At startup: a keys file that exists but cannot be parsed stops the
        server (raises KeyFileError or OSError). A missing or empty one starts
        a server that refuses every key until one is added."""
        self._next_check = time.monotonic() + CHECK_INTERVAL_SECONDS
        if not self.required:
            self._set_file_ok(True)
            return
        signature = self._stat()
        try:
            keys, self._marked = keyfile.read_complete(self.path)
        except keyfile.IncompleteKeyFileError as exc:
            self._keep_keys(signature, exc)
            return
        self._set_keys(keys)
        self._accept(signature)
        self._set_file_ok(True)

    def refresh(self) -> None:
        """Per request: re-read the file if a check is due and it changed."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_INTERVAL_SECONDS
        if self.required:
            self._reload()

    def authenticate(self, key: bytes) -> str | None:
        """The id of the key, or None. A key not seen valid before is hashed and
        compared with every stored digest, so the time taken does not depend on
        which (if any) matches.

        A key once found valid is remembered until the keys change: a client
        sends the same key on every request, and the SHA-256 was about a
        third of the check's cost. The lookup is by the dict's keyed (SipHash) hash, so
        an invalid key learns nothing from its timing either; only keys that
        matched are remembered, so the memo is bounded by the keys file.
        """
        found = self._valid.get(key)
        if found is not None:
            return found
        digest = hashlib.sha256(key).digest()
        for stored in self._keys:
            if hmac.compare_digest(digest, stored.digest):
                found = stored.key_id
        if found is not None:
            self._valid[key] = found
        return found

    def unfollowed_reason(self) -> str | None:
        """Why this worker must not count as ready: its copy of the keys is
        no longer kept current (the follower gone), so a key revoked since
        would still work here. None when followed, or not a copy."""
        if self._followed_every is None or not self.required:
            return None
        age = follower_heartbeat.seconds_since_touch(self.path, self._created)
        unfollowed = age > follower_heartbeat.stale_after(self._followed_every)
        if unfollowed != self._unfollowed:
            self._unfollowed = unfollowed
            fields = {"file": str(self.path), "seconds_since_followed": round(age, 1)}
            if unfollowed:
                log.error("API keys copy no longer followed: not ready", extra={"fields": fields})
            else:
                log.info("API keys copy followed again", extra={"fields": fields})
        if not unfollowed:
            return None
        # Public (probes carry no key): the path is in the log line.
        return f"API keys copy not refreshed for {age:.0f} s (its follower is gone)"

    def remember_authorization(self, authorization: bytes, key: bytes, key_id: str) -> None:
        """Called with a key found valid: if the Authorization header was
        exactly `Bearer <key>`, presented_key gives that key for that value
        whatever else the request carries, so the value alone names the key."""
        if authorization == b"Bearer " + key:
            self.valid_authorizations[authorization] = key_id

    def _set_keys(self, keys: tuple[keyfile.StoredKey, ...]) -> None:
        # A revoked key must not stay valid through the memos.
        self._valid = {}
        self.valid_authorizations = {}
        self._keys = keys

    @property
    def file_ok(self) -> bool:
        """False while the file on disk is not the one whose keys are in use."""
        return self._file_ok is not False

    def _set_file_ok(self, ok: bool) -> None:
        if ok != self._file_ok:
            self._file_ok = ok
            if self._on_file_state is not None:
                self._on_file_state(ok)

    def _stat(self) -> Signature:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _accept(self, signature: Signature) -> None:
        self._signature = signature
        self._refused = "never"
        self._reread = signature is not None and time.time() - signature[2] / 1e9 < RACY_SECONDS

    def _keep_keys(self, signature: Signature, exc: Exception) -> None:
        # Possibly a write in progress: keep the keys we have, look again at
        # the next check, and say so once per state of the file.
        self._set_file_ok(False)
        if signature != self._refused:
            self._refused = signature
            log.warning(
                "API keys file unusable; keeping the keys loaded before",
                extra={
                    "fields": {
                        "file": str(self.path),
                        "reason": str(exc),
                        "key_ids": self.key_ids,
                    }
                },
            )

    def _reload(self) -> None:
        signature: Signature = None
        try:
            signature = self._stat()
            if signature == self._signature and not self._reread:
                return
            keys, marked = keyfile.read_complete(self.path, require_marker=self._marked)
        except (keyfile.KeyFileError, OSError) as exc:
            self._keep_keys(signature, exc)
            return
        changed = keys != self._keys
        self._marked = marked
        self._set_keys(keys)
        self._accept(signature)
        self._set_file_ok(True)
        if changed:
            log.info(
                "API keys reloaded",
                extra={"fields": {"file": str(self.path), "key_ids": self.key_ids}},
            )


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, str]:
    """The key a request carries, or None and why not.

    `Authorization: Bearer` wins; an Authorization header of another scheme
    (say, Basic for an intermediate proxy) falls through to X-API-Key.
    docker/nginx/api_keys.js applies the same rule.
    """
    # dict() in C beats a Python loop over the headers; a repeated header
    # counts with its last value either way.
    by_name = dict(headers)
    authorization = by_name.get(b"authorization")
    api_key = by_name.get(b"x-api-key")
    if authorization is not None:
        if authorization[:7] == b"Bearer ":
            # The usual header, checked without splitting it; anything the
            # general rule below would treat differently falls through to it.
            token = authorization[7:]
            if token and b" " not in token and token.strip() == token:
                return token, ""
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() == b"bearer":
            return (token, "") if token and b" " not in token else (None, MALFORMED_AUTHORIZATION)
        if api_key is None:
            return None, MALFORMED_AUTHORIZATION
    if api_key is not None:
        api_key = api_key.strip()
        return (api_key, "") if api_key and b" " not in api_key else (None, MALFORMED_API_KEY)
    return None, MISSING


class ApiKeyMiddleware:
    """401 with `WWW-Authenticate: Bearer` unless the request carries a stored
    key; the key's id goes into scope["state"]["key_id"] for the access log and
    the per-key metric. The routes declared public stay open (probes and load
    balancers carry no key; /metrics is for Prometheus on the internal network,
    the proxy answers it 403), and everything is open with AUTH=off."""

    def __init__(self, app: ASGIApp, store: KeyStore, open_paths: OpenPaths) -> None:
        self.app = app
        self.store = store
        self.open_paths = open_paths

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine function: it hands back the next app's coroutine
        # (or the refusal) for the caller to await, one frame less a request.
        if scope["type"] == "http":
            store = self.store
            store.refresh()
            if store.enabled and scope["path"] not in self.open_paths:
                by_name = dict(scope["headers"])
                authorization = by_name.get(b"authorization", b"")
                key_id = store.valid_authorizations.get(authorization)
                if key_id is None:
                    key, problem = presented_key(by_name.items())
                    if key is None or (key_id := store.authenticate(key)) is None:
                        return self._refuse(scope, send, problem or INVALID)
                    store.remember_authorization(authorization, key, key_id)
                scope.setdefault("state", {})["key_id"] = key_id
        return self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, detail: str) -> None:
        await send_error(send, scope, 401, detail, CHALLENGE)
