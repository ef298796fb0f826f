"""The proxy's own metrics (docker/nginx/nginx.conf, "the proxy's metrics"): a real
nginx running the shipped configuration in front of a port nobody listens on and a
real Gunicorn, scraped by a real Prometheus with the shipped `proxy` job.

Predictions first go through (the dead port is each nginx worker's first pick, so
nginx retries on the Gunicorn); nginx reloads (new workers, the counts must stay);
then Gunicorn stops (no replica can be reached: 502, answered as 503), then the
rate limit refuses the rest (429). What Prometheus holds must be exactly what
nginx's access log says happened, request by request, and what the client saw.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.bundles import REPO, SETOSA
from tests.support.nginx import Nginx, running_nginx
from tests.support.prometheus import Prometheus, running_prometheus
from tests.support.servers import free_port, running_gunicorn, wait_for

pytestmark = pytest.mark.process

PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
PROXY_JOB = "proxy"
THROUGH, UNREACHABLE, REFUSED = 3, 3, 4
# AUTH=off: every request in the per-address bucket. 1 r/m with this burst lets
# exactly the requests of the first two phases through (as long as the test
# takes under a minute; the counts below come from what happened either way).
SETTINGS = {
    "AUTH": "off",
    "PROXY_OPEN_RATE": "1r/m",
    "PROXY_OPEN_BURST": str(THROUGH + UNREACHABLE - 1),
}


def _predictions(proxy: Nginx, count: int) -> list[int]:
    """`count` predictions, each on a new connection (so both nginx workers get some)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=10, limits=limits) as client:
        return [client.post(f"{proxy.url}/predict", json=SETOSA).status_code for _ in range(count)]


def _logged(proxy: Nginx) -> list[dict[str, Any]]:
    """nginx's JSON access log: one object per request (health checks are not logged)."""
    return [json.loads(line) for line in proxy.access_log.read_text().splitlines() if line]


def _expected(logged: list[dict[str, Any]]) -> tuple[Counter[str], Counter[str], int, int]:
    """Answers by status, tries at a replica by status, retries, and picks that found
    no live replica, from the access log. nginx's own 502 (no replica reached) goes to
    the client as 503: counted as the 502 it was."""
    answers: Counter[str] = Counter()
    tries: Counter[str] = Counter()
    retries = unavailable = 0
    for request in logged:
        assert request["uri"] == "/predict", request
        picks = [s for s in request["upstream_status"].split(", ") if s]
        addresses = [a for a in request["upstream_addr"].split(", ") if a]
        assert len(picks) == len(addresses), request
        # A pick with every replica marked failed names the upstream, not an address.
        tried = [s for s, a in zip(picks, addresses, strict=True) if ":" in a]
        tries.update(tried)
        retries += max(len(tried) - 1, 0)
        unavailable += len(picks) - len(tried)
        status = str(request["status"])
        if status == "503":
            assert picks[-1] == "502", request
            status = "502"
        answers[status] += 1
    return answers, tries, retries, unavailable


def _scraped(prometheus: Prometheus, metric: str) -> Counter[str]:
    """The `predict` route's series of a counter, by status (retries: one key, "")."""
    found: Counter[str] = Counter()
    for sample in prometheus.query(f'{metric}{{job="{PROXY_JOB}", route="predict"}}'):
        found[sample["metric"].get("status", "")] = int(float(sample["value"][1]))
    return found


def _prometheus_config(directory: Path, metrics_port: int) -> Path:
    """The shipped `proxy` job, pointed at this nginx's metrics listener, at 1 s."""
    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [job for job in shipped["scrape_configs"] if job["job_name"] == PROXY_JOB]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [job]}
    directory.mkdir()
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_the_proxy_counts_rate_limits_unreachable_replicas_and_retries_exactly(
    model_dir: Path, tmp_path: Path
) -> None:
    dead = free_port()
    with (
        running_gunicorn(model_dir, tmp_path / "gunicorn", workers=1) as api,
        running_nginx(tmp_path / "nginx", [dead, api.port], SETTINGS) as proxy,
    ):
        config = _prometheus_config(tmp_path / "prometheus", proxy.metrics_port)
        with running_prometheus(config, tmp_path / "tsdb", free_port()) as prometheus:
            seen = _predictions(proxy, THROUGH)
            assert seen == [200] * THROUGH
            # An operator's reload (after editing nginx.conf; replica changes
            # need none): what the old workers counted stays (checked below).
            proxy.reload()
            api.stop()
            seen += _predictions(proxy, UNREACHABLE + REFUSED)
            assert seen[THROUGH : THROUGH + UNREACHABLE] == [503] * UNREACHABLE, seen

            # nginx logs (and counts) a request after its answer went out.
            wait_for(lambda: len(_logged(proxy)) == len(seen), 10, what="every request logged")
            answers, tries, retries, unavailable = _expected(_logged(proxy))
            # What the client saw, with nginx's 503 counted as its 502.
            assert answers == Counter(str(502 if s == 503 else s) for s in seen)
            assert answers["429"] >= 1, seen
            assert retries >= 1, "the dead port, each worker's first pick, was never tried"

            def scraped_everything() -> bool:
                return (
                    _scraped(prometheus, "nginx_http_responses_total") == answers
                    and _scraped(prometheus, "nginx_upstream_tries_total") == tries
                    and _scraped(prometheus, "nginx_upstream_retries_total")[""] == retries
                    and _scraped(prometheus, "nginx_upstream_unavailable_total")[""] == unavailable
                )

            wait_for(scraped_everything, 30, interval=0.2, what="the proxy's counts scraped")

            def single(expr: str) -> float:
                (sample,) = prometheus.query(expr)
                return float(sample["value"][1])

            # Every request came on a connection of its own, and none was refused.
            accepted = single(f'nginx_connections_accepted{{job="{PROXY_JOB}"}}')
            assert accepted >= len(seen)
            assert single(f'nginx_connections_handled{{job="{PROXY_JOB}"}}') == accepted
            assert single(f'nginx_up{{job="{PROXY_JOB}"}}') == 1

            # The public listener never serves them; the metrics one serves nothing else.
            public = httpx.get(f"{proxy.url}/metrics", timeout=5)
            assert public.status_code == 403
            assert "nginx_" not in public.text
            for path in ("/stub_status", "/", "/metrics/"):
                response = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}{path}", timeout=5)
                assert response.status_code == 404, path


def test_a_replica_that_does_not_accept_in_time_is_a_timed_out_try_answered_as_503(
    tmp_path: Path,
) -> None:
    """A replica whose accept queue is full drops the proxy's SYN: the connect
    times out (504 at nginx), the client gets the 503 with Retry-After it
    gets for any replica it cannot reach, and the proxy counts a 504, kept
    apart from a refused connection's 502 and a replica's own 503."""
    silent = socket.socket()
    fillers = []
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        # Never accepted: once the queue holds these, Linux drops new SYNs.
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            fillers.append(filler)
        with running_nginx(tmp_path / "nginx", [silent.getsockname()[1]], SETTINGS) as proxy:
            answer = httpx.post(f"{proxy.url}/predict", json=SETOSA, timeout=10)
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"]
            wait_for(lambda: len(_logged(proxy)) == 1, 10, what="the request logged")
            (logged,) = _logged(proxy)
            assert logged["upstream_status"] == "504", logged
            metrics = httpx.get(proxy.metrics_url, timeout=5).text
            assert 'nginx_http_responses_total{route="predict",status="504"} 1' in metrics
            assert 'nginx_upstream_tries_total{route="predict",status="504"} 1' in metrics
            assert 'status="502"' not in metrics
            assert 'status="503"' not in metrics
    finally:
        for filler in fillers:
            filler.close()
        silent.close()
