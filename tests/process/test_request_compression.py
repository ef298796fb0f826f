"""Decompression bombs against a real Gunicorn worker: 413, and the worker's
memory never holds what they would inflate to."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.bundles import SETOSA
from tests.support.servers import Gunicorn, running_gunicorn
from tests.support.v2 import INFER, ROWS, json_request

pytestmark = pytest.mark.process

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, trained_bundle: Path) -> Iterator[Gunicorn]:
    with running_gunicorn(
        trained_bundle.parents[1], tmp_path_factory.mktemp("bombs"), workers=1
    ) as gunicorn:
        yield gunicorn


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS now and VmHWM, the peak RSS the process ever had."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def test_bombs_get_413_and_the_worker_never_holds_what_they_inflate_to(server: Gunicorn) -> None:
    (worker,) = server.worker_pids()
    bombs = {
        # About 2 KB that inflates to 2 MiB, twice the default limit.
        "small": gzip.compress(bytes(2 * MIB), compresslevel=9),
        # About 64 KB that would inflate to 64 MiB.
        "large": zlib.compress(bytes(64 * MIB), 9),
    }
    assert len(bombs["small"]) < 4096
    with httpx.Client(base_url=server.url, timeout=30) as client:
        # Warm: what serving compressed requests allocates anyway.
        for _ in range(20):
            ok = client.post(
                "/predict",
                content=gzip.compress(httpx.Request("POST", "/", json=SETOSA).read()),
                headers={"content-type": "application/json", "content-encoding": "gzip"},
            )
            assert ok.status_code == 200, ok.text
            v2 = client.post(INFER, json=json_request(ROWS))
            assert v2.status_code == 200
        before = _memory_kib(worker)
        for _ in range(10):
            for name, bomb in bombs.items():
                coding = "gzip" if name == "small" else "deflate"
                for path in ("/predict", "/predict/batch", INFER):
                    response = client.post(
                        path,
                        content=bomb,
                        headers={"content-type": "application/json", "content-encoding": coding},
                    )
                    assert response.status_code == 413, (name, path, response.text)
                    assert "inflates past the limit" in response.text
        after = _memory_kib(worker)
    assert server.worker_pids() == {worker}
    # Inflated, the large bomb alone is 64 MiB; bounded, each is at most the
    # 1 MiB limit, freed at once.
    assert after["VmHWM"] - before["VmHWM"] < 8 * 1024, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 8 * 1024, (before, after)
