"""A real nginx on 127.0.0.1 with the shipped configuration, in front of a test server.

docker/nginx/render.sh renders the template exactly as the proxy container's
entrypoint does; only what ties it to compose is rewritten here: the listen
and metrics addresses, the upstreams (`api:8000`, a canary's `canary:8000`),
the pid and temp paths, and the user the workers run as (when the tests run as root,
root, so they can read files under pytest's private temporary directories).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.bundles import REPO
from tests.support.servers import free_port, wait_for

NGINX_DIR = REPO / "docker" / "nginx"
NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")


# AUTH=off: every request in the open bucket, its rate far above any test's;
# answers say which upstream answered.
OPEN_PROXY_SETTINGS = {
    "AUTH": "off",
    "PROXY_OPEN_RATE": "10000r/s",
    "PROXY_OPEN_BURST": "10000",
    "PROXY_UPSTREAM_ADDR_HEADER": "on",
}


def answering_host(upstream_addr: str) -> str:
    """The host that answered, from an X-Upstream-Addr header.

    nginx lists every upstream it tried, in order ("10.0.0.3:8000, 10.0.0.4:8000"
    when the first refused and the request went on), so the answer came from the
    last one.
    """
    return upstream_addr.rsplit(",", 1)[-1].strip().rsplit(":", 1)[0]


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    access_log: Path
    error_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """The proxy's own metrics (the listener that is never the public one)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def workers(self) -> set[int]:
        """The master's worker processes now (their parent pid, from /proc)."""
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid ...": comm may hold spaces, never ") ".
                fields = stat.read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(fields[1]) == self.process.pid:
                found.add(int(stat.parent.name))
        return found

    def reload(self) -> None:
        """`nginx -s reload` (SIGHUP), returning once every worker is a new one: the
        old ones have finished their connections and exited."""
        old = self.workers()
        self.process.send_signal(signal.SIGHUP)

        def only_new_workers() -> bool:
            now = self.workers()
            return bool(now) and not now & old

        wait_for(only_new_workers, 30, what="nginx's workers to be replaced by the reload")


@dataclass(frozen=True)
class Canary:
    """A second upstream and its share, as docker/nginx/canary.sh renders it."""

    port: int
    percent: int
    sticky: bool = False


def render_canary(out_dir: Path, canary: Canary) -> None:
    share = [str(canary.percent), "1" if canary.sticky else "0"]
    subprocess.run(["sh", str(NGINX_DIR / "canary.sh"), "share", str(out_dir), *share], check=True)
    write_peers(out_dir, "canary", [canary.port])


def write_peers(out_dir: Path, upstream: str, ports: list[int]) -> None:
    """What entrypoint.sh writes when the upstream's name resolves: the
    replicas' addresses, which upstreams.lua reads in place (no reload)."""
    peers = out_dir / "peers" / upstream
    part = peers.with_suffix(".part")
    part.write_text("".join(f"127.0.0.1:{port}\n" for port in ports))
    part.replace(peers)


def render(
    out_dir: Path,
    upstream_port: int | Sequence[int],
    port: int,
    settings: dict[str, str],
    canary: Canary | None = None,
    metrics_port: int | None = None,
) -> Path:
    subprocess.run(
        ["sh", str(NGINX_DIR / "render.sh"), str(NGINX_DIR), str(out_dir)],
        env={**os.environ, **settings},
        check=True,
    )
    # Several upstream ports: the replicas in order (a port nobody listens on
    # makes nginx retry the next, as for a replica gone).
    ports = [upstream_port] if isinstance(upstream_port, int) else list(upstream_port)
    write_peers(out_dir, "api", ports)
    if canary is not None:
        render_canary(out_dir, canary)
    conf = out_dir / "nginx.conf"
    text = conf.read_text()
    replacements = [
        (r"listen 8080 default_server;", f"listen 127.0.0.1:{port} default_server;"),
        (r"listen 9113;", f"listen 127.0.0.1:{metrics_port or free_port()};"),
        (r"pid /tmp/nginx\.pid;", f"pid {out_dir}/nginx.pid;"),
        (r"/tmp/nginx-", f"{out_dir}/nginx-"),
    ]
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text)
        assert count, f"{pattern!r} not in the shipped nginx.conf any more"
    if os.geteuid() == 0:
        text = "user root;\n" + text
    conf.write_text(text)
    return conf


@contextmanager
def running_nginx(
    work: Path,
    upstream_port: int | Sequence[int],
    settings: dict[str, str],
    canary: Canary | None = None,
) -> Iterator[Nginx]:
    work.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    conf = render(work, upstream_port, port, settings, canary, metrics_port)
    subprocess.run(["nginx", "-t", "-q", "-c", str(conf)], check=True)
    access_log, error_log = work / "nginx.out", work / "nginx.err"
    with access_log.open("wb") as out, error_log.open("wb") as err:
        process = subprocess.Popen(
            ["nginx", "-c", str(conf), "-g", "daemon off;"],
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    server = Nginx(process, port, metrics_port, access_log, error_log)
    try:

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited {process.returncode}: {error_log.read_text()}")
            try:
                return httpx.get(f"{server.url}/nginx-health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 30, what="nginx to answer")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
