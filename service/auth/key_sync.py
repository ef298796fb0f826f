"""The API keys file, kept current over HTTP where a secret cannot change in place.

On Docker Swarm a secret is immutable: a new version reaches a service only by
replacing its tasks, and the proxy, which holds the published port, can only
be replaced stop-first (refused connections). So on the Swarm stack one small
`keys` service mounts the secret and serves it, and the api tasks and the
proxy copy it into a local file every second; their readers (the api's key
ring, nginx's njs check) re-read that file in place as they do on compose.
A rotation replaces the `keys` task alone, and is first pushed into the
running one (stack.sh keys), so the copies change without waiting for it.

    python -m service.auth.key_sync serve --file F --port P [--bind ADDR] [--pushed Q]
        the keys service: GET /api-keys answers Q once something was pushed
        there, else F (200, its SHA-256 as ETag) while it is complete, else
        503 naming the problem.
    python -m service.auth.key_sync push --file Q
        writes the complete keys file on stdin to Q (atomically); anything
        else is refused (exit 1) and Q stays as it was.
    python -m service.auth.key_sync copies --sha256 D --port P [--keys K] NAME...
        run beside the keys service: whether every address NAME resolves to
        (tasks.api: every api task, on every node) last copied the file
        with SHA-256 D from some keys task (K: tasks.keys); GET /copies of each
        says what it served to whom. One line per address ("held NAME
        ADDRESS" or "missing NAME ADDRESS"); exit 0 when none is missing.
    python -m service.auth.key_sync follow --url URL --file F [--interval S] [--mode M]
    python -m service.auth.key_sync sync --url URL --file F [--within S] [--mode M]
        the follower (sync: one copy, retried for S seconds, at start):
        copies a complete answer to F (atomically: a new file renamed over F)
        when it differs; anything else (no answer, a 503, a
        file without the end marker) keeps F as it is, with a WARNING line
        once per state, so keys fail closed to the last good set. `follow`
        never returns, and stamps F.followed every S seconds
        (service.auth.follower_heartbeat): the api's workers are not ready
        while nobody keeps their copy current.

Standard library only, as service.auth.keys.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from service.auth import follower_heartbeat, keyfile

KEYS_PATH = "/api-keys"
COPIES_PATH = "/copies"
FETCH_TIMEOUT_SECONDS = 2.0


def _log(level: str, message: str, **fields: object) -> None:
    line = {"level": level, "logger": "ml-api.key-sync", "message": message, **fields}
    print(json.dumps(line), file=sys.stderr, flush=True)


class _KeysHandler(BaseHTTPRequestHandler):
    server: _KeysServer

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, "ok\n")
            return
        if self.path == COPIES_PATH:
            self._answer(200, json.dumps(self.server.copied))
            return
        if self.path != KEYS_PATH:
            self._answer(404, f"not found: {KEYS_PATH} only\n")
            return
        source = self.server.source()
        try:
            text = keyfile.stable_text(source)
            keyfile.complete_keys(text, str(source), require_marker=True)
        except (keyfile.KeyFileError, OSError) as exc:
            self._answer(503, f"keys file unusable: {exc}\n")
            return
        digest = hashlib.sha256(text.encode()).hexdigest()
        self._answer(200, text, etag=digest)
        # Each copier asks every second: what it was last given is what it holds.
        self.server.copied[self.client_address[0]] = digest

    def _answer(self, status: int, body: str, etag: str | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if etag is not None:
            self.send_header("ETag", f'"{etag}"')
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # One line a second per follower: not worth a log line each.
        return


class _KeysServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], keys_file: Path, pushed: Path | None) -> None:
        super().__init__(address, _KeysHandler)
        self.keys_file = keys_file
        self.pushed = pushed
        self.copied: dict[str, str] = {}  # copier's address -> SHA-256 last served

    def source(self) -> Path:
        # A push is newer than the mounted secret: it is the rotation this
        # task is about to be replaced for (by a task mounting that secret).
        if self.pushed is not None and self.pushed.exists():
            return self.pushed
        return self.keys_file


def serve(keys_file: Path, bind: str, port: int, pushed: Path | None = None) -> None:
    # As a container's PID 1 a signal without a handler is ignored: without
    # this a stop-first rotation waited out the grace period for its SIGKILL.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = _KeysServer((bind, port), keys_file, pushed)
    _log("INFO", "serving API keys", file=str(keys_file), address=f"{bind}:{port}")
    server.serve_forever()


def replace_file(path: Path, text: str, mode: int) -> bool:
    """Writes `text` to `path` unless it holds it already (a new file renamed
    over it, so a reader never sees half); True when it changed."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    part = path.with_name(f".{path.name}.part")
    part.write_text(text)
    part.chmod(mode)
    os.replace(part, path)
    return True


def push(text: str, pushed: Path) -> int:
    """The `push` command: a complete keys file, or nothing, for `serve --pushed`."""
    try:
        keys, _ = keyfile.complete_keys(text, "the pushed keys file", require_marker=True)
    except keyfile.KeyFileError as exc:
        _log("ERROR", "API keys not pushed", file=str(pushed), reason=str(exc))
        return 1
    replace_file(pushed, text, 0o400)
    _log(
        "INFO",
        "API keys pushed",
        file=str(pushed),
        key_ids=[key.key_id for key in keys],
        sha256=hashlib.sha256(text.encode()).hexdigest(),
    )
    return 0


class Follower:
    """Copies the keys service's answer to `keys_file` while it is complete."""

    def __init__(self, url: str, keys_file: Path, mode: int = keyfile.FILE_MODE) -> None:
        self.url = url
        self.keys_file = keys_file
        self.mode = mode
        self._problem: str | None = ""  # "": no state yet; None: in sync
        self._stamp_problem: str | None = None
        self._attempt_began: float | None = None  # time.monotonic() of the one running

    def sync(self) -> bool:
        """One copy; True when the file now holds the service's keys."""
        try:
            with urllib.request.urlopen(self.url, timeout=FETCH_TIMEOUT_SECONDS) as answer:
                text = answer.read().decode()
            keys, _ = keyfile.complete_keys(text, self.url, require_marker=True)
        except urllib.error.HTTPError as exc:
            return self._failed(f"{self.url} answered {exc.code}: {exc.read().decode()[:200]}")
        except http.client.HTTPException as exc:
            # Not an OSError: an answer cut short (a keys task stopped while
            # answering) or a malformed one.
            return self._failed(f"{self.url} answered badly: {exc!r}")
        except (keyfile.KeyFileError, OSError, UnicodeDecodeError, ValueError) as exc:
            return self._failed(str(exc))
        try:
            changed = replace_file(self.keys_file, text, self.mode)
        except OSError as exc:
            # A full or unwritable disk must not end the follower: it keeps
            # trying, and the readers keep the copy they have.
            return self._failed(f"cannot write {self.keys_file}: {exc}")
        if changed or self._problem is not None:
            _log(
                "INFO",
                "API keys copied" if changed else "API keys in sync again",
                file=str(self.keys_file),
                key_ids=[key.key_id for key in keys],
                sha256=hashlib.sha256(text.encode()).hexdigest(),
            )
        self._problem = None
        return True

    def _failed(self, problem: str) -> bool:
        if problem != self._problem:
            _log(
                "WARNING",
                "API keys not copied; keeping the keys file as it is",
                file=str(self.keys_file),
                reason=problem,
            )
            self._problem = problem
        return False

    def sync_within(self, seconds: float, interval: float = 0.5) -> bool:
        """Retry until one copy succeeds or `seconds` pass: at start, so the
        server does not begin with no keys while the keys service starts."""
        deadline = time.monotonic() + seconds
        while not self.sync():
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return True

    def follow(self, interval: float) -> None:
        """Never returns: a follower that ended would leave the copy as it is,
        open to every key revoked after. A thread stamps the copy meanwhile
        (follower_heartbeat) while attempts keep ending: a keys service slow
        to answer or to resolve must not make every replica unready at once,
        and one that holds an attempt for ever must not keep a stamp fresh."""
        threading.Thread(target=self._stamp_every, args=(interval,), daemon=True).start()
        while True:
            self.attempt()
            time.sleep(interval)

    def attempt(self) -> None:
        self._attempt_began = time.monotonic()
        try:
            self.sync()
        except Exception as exc:  # whatever it was: try again next time
            self._failed(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            self._attempt_began = None

    def _stamp_every(self, interval: float) -> None:
        while True:
            self.stamp_unless_hung()
            time.sleep(interval)

    def stamp_unless_hung(self) -> None:
        began = self._attempt_began
        if began is None or time.monotonic() - began < follower_heartbeat.ATTEMPT_HUNG_SECONDS:
            self.stamp()

    def stamp(self) -> None:
        problem: str | None = None
        try:
            follower_heartbeat.touch(self.keys_file)
        except OSError as exc:
            problem = str(exc)
        if problem != self._stamp_problem and problem is not None:
            _log("ERROR", "follower stamp not written: the copy counts as stale", reason=problem)
        self._stamp_problem = problem


def copy_states(sha256: str, keys: str, port: int, names: list[str]) -> list[str]:
    """One line per address of `names`: "held NAME ADDRESS" when a keys task
    (an address of `keys`) gave it `sha256` last, else "missing NAME ADDRESS"."""
    served: set[str] = set()
    for keys_task in _addresses(keys):
        url = f"http://{keys_task}:{port}{COPIES_PATH}"
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS) as answer:
                copied: dict[str, str] = json.loads(answer.read())
        except (OSError, ValueError):
            continue  # a keys task stopping: the copiers ask the other one
        served.update(address for address, digest in copied.items() if digest == sha256)
    return [
        f"{'held' if address in served else 'missing'} {name} {address}"
        for name in names
        for address in _addresses(name)
    ]


def _addresses(name: str) -> list[str]:
    try:
        found = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({str(entry[4][0]) for entry in found})


def follower_command(url: str, keys_file: Path, interval: float) -> list[str]:
    """The `follow` process the Gunicorn master starts beside its workers."""
    return [
        sys.executable, "-m", "service.auth.key_sync", "follow",
        "--url", url, "--file", str(keys_file), "--interval", str(interval),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.auth.key_sync", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_args = commands.add_parser("serve", help="serve a keys file")
    serve_args.add_argument("--file", type=Path, required=True)
    serve_args.add_argument("--bind", default="0.0.0.0")
    serve_args.add_argument("--port", type=int, required=True)
    serve_args.add_argument("--pushed", type=Path, help="served instead of --file once it exists")
    push_args = commands.add_parser("push", help="write the keys file on stdin for serve --pushed")
    push_args.add_argument("--file", type=Path, required=True)
    copies_args = commands.add_parser("copies", help="whether every copier holds a file")
    copies_args.add_argument("--sha256", required=True)
    copies_args.add_argument("--port", type=int, required=True)
    copies_args.add_argument("--keys", default="tasks.keys", help="the keys tasks' DNS name")
    copies_args.add_argument("names", nargs="+", help="copiers' DNS names (tasks.api ...)")
    for name, help_text in (
        ("follow", "keep a local copy current"),
        ("sync", "one copy, retried for --within seconds; exit 1 if none succeeded"),
    ):
        follower = commands.add_parser(name, help=help_text)
        follower.add_argument("--url", required=True)
        follower.add_argument("--file", type=Path, required=True)
        follower.add_argument(
            "--mode", type=lambda text: int(text, 8), default=keyfile.FILE_MODE, help="octal"
        )
        follower.add_argument("--interval", type=float, default=1.0)
        follower.add_argument("--within", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.file, args.bind, args.port, args.pushed)
        return 0
    if args.command == "push":
        return push(sys.stdin.read(), args.file)
    if args.command == "copies":
        states = copy_states(args.sha256, args.keys, args.port, args.names)
        print("\n".join(states))
        return 1 if any(state.startswith("missing ") for state in states) else 0
    follower_ = Follower(args.url, args.file, args.mode)
    if args.command == "sync":
        return 0 if follower_.sync_within(args.within) else 1
    follower_.follow(args.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
