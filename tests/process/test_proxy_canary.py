"""The proxy's canary split (docker/nginx/canary.sh) with a real nginx in
front of two real Gunicorns: the share of requests each upstream answers
follows the weight, per request; with STICKY=1 every request of one API key
lands on the same side."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.bundles import SETOSA
from tests.support.keepalive_clients import keep_alive_clients
from tests.support.nginx import NGINX_DIR, OPEN_PROXY_SETTINGS, Canary, Nginx, running_nginx
from tests.support.servers import Gunicorn, two_open_gunicorns

pytestmark = pytest.mark.process

REQUESTS = 2000


@pytest.fixture
def upstreams(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    with two_open_gunicorns(model_dir, tmp_path, ("primary", "canary")) as pair:
        yield pair


def test_a_change_of_share_keeps_keep_alive_clients_connected(
    upstreams: tuple[Gunicorn, Gunicorn], tmp_path: Path
) -> None:
    """No reload: canary.sh's share is read in place, as the replicas are."""
    primary, canary = upstreams
    on_primary, on_canary = f"127.0.0.1:{primary.port}", f"127.0.0.1:{canary.port}"
    conf_dir = tmp_path / "nginx"
    with (
        running_nginx(conf_dir, primary.port, OPEN_PROXY_SETTINGS, Canary(canary.port, 0)) as proxy,
        keep_alive_clients(proxy.port) as clients,
    ):
        clients.wait_until("the primary alone", lambda seen: set(seen) == {on_primary})
        for percent, sides in (
            (50, {on_primary, on_canary}),
            (100, {on_canary}),
            (0, {on_primary}),
        ):
            share = ["sh", str(NGINX_DIR / "canary.sh"), "share", str(conf_dir), str(percent), "0"]
            subprocess.run(share, check=True)
            clients.wait_until(f"{percent} % to the canary", _exactly(sides))
        clients.stop.set()
    clients.assert_no_connection_lost()


def _exactly(sides: set[str]) -> Callable[[list[str]], bool]:
    return lambda seen: set(seen) == sides


def _answered_by(proxy: Nginx, headers: dict[str, str], requests: int) -> Counter[str]:
    """Which upstream (address) answered each of `requests` predictions."""
    answered: Counter[str] = Counter()
    with httpx.Client(timeout=10, headers=headers) as client:
        for _ in range(requests):
            response = client.post(f"{proxy.url}/predict", json=SETOSA)
            assert response.status_code == 200, response.text
            answered[response.headers["x-upstream-addr"]] += 1
    return answered


@pytest.mark.parametrize("percent", [10, 50])
def test_the_canary_answers_its_share_of_requests(
    upstreams: tuple[Gunicorn, Gunicorn], tmp_path: Path, percent: int
) -> None:
    primary, canary = upstreams
    with running_nginx(
        tmp_path / "nginx", primary.port, OPEN_PROXY_SETTINGS, Canary(canary.port, percent)
    ) as proxy:
        answered = _answered_by(proxy, {}, REQUESTS)
    assert set(answered) == {f"127.0.0.1:{primary.port}", f"127.0.0.1:{canary.port}"}
    share = 100 * answered[f"127.0.0.1:{canary.port}"] / REQUESTS
    # Binomial spread at 2,000 requests: at most 1.1 points; 5 is 4.5 of them.
    assert abs(share - percent) <= 5, share


def test_sticky_keeps_each_api_key_on_one_side(
    upstreams: tuple[Gunicorn, Gunicorn], tmp_path: Path
) -> None:
    primary, canary = upstreams
    sides: set[str] = set()
    with running_nginx(
        tmp_path / "nginx", primary.port, OPEN_PROXY_SETTINGS, Canary(canary.port, 50, sticky=True)
    ) as proxy:
        for client in range(12):
            answered = _answered_by(proxy, {"X-API-Key": f"client-{client}"}, 20)
            assert len(answered) == 1, (client, answered)
            sides |= set(answered)
    # Fixed keys: the split is the same on every run, and puts some on each side.
    assert sides == {f"127.0.0.1:{primary.port}", f"127.0.0.1:{canary.port}"}
