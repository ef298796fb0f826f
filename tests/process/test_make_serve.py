"""`make serve` listens on loopback only unless BIND says otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.bundles import REPO
from tests.support.servers import free_port, ready, wait_for

pytestmark = pytest.mark.process


def listening_addresses(port: int) -> set[str]:
    """Local addresses of listening TCP sockets on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_make_serve_binds_loopback_by_default(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    env.pop("BIND", None)
    # The child keeps its own descriptor of the log.
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "serve"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: ready(f"http://127.0.0.1:{port}"), 120, what="make serve")
        addresses = listening_addresses(port)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    # 0100007F is 127.0.0.1 in /proc's byte order; 00000000 would be every interface.
    assert addresses == {"0100007F"}
