"""The compose stack, end to end: image, proxy, Prometheus, scaling, draining.

Tests run in file order and share one stack (see conftest.py); the last one
takes it down. Every loop is bounded in count and time, and all traffic goes
to 127.0.0.1 or stays on the compose network.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from typing import Any

import pytest

from tests.e2e.support import (
    IMAGE,
    MODEL_VERSION,
    PROJECT,
    SETOSA,
    TIMINGS,
    LoadStream,
    Stack,
    assert_paged_once,
    http,
    run,
    wait_for,
)
from tests.support.nginx import answering_host

APP_UID = 10001


def _check_setosa(body: dict[str, Any]) -> None:
    assert body["predicted_class"] == 0
    assert body["predicted_class_name"] == "setosa"
    assert body["model_version"] == MODEL_VERSION
    assert 0.5 < body["confidence"] <= 1.0
    assert set(body["probabilities"]) == {"setosa", "versicolor", "virginica"}


def _prom(stack: Stack, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    resp = http("GET", f"{stack.prometheus}{path}{'?' + query if query else ''}")
    assert resp.status == 200, resp.body[:500]
    return resp.json()["data"]


def _api_targets(stack: Stack) -> list[dict[str, Any]]:
    """Prometheus' active targets that are api replicas (port 8000, /metrics)."""
    data = _prom(stack, "/api/v1/targets", state="active")
    return [t for t in data["activeTargets"] if urllib.parse.urlparse(t["scrapeUrl"]).port == 8000]


# ------------------------------------------------------------------ tests ---


def test_predict_through_proxy(stack: Stack) -> None:
    rid = f"e2e-{uuid.uuid4()}"
    resp = stack.predict(headers={"X-Request-ID": rid})
    assert resp.status == 200, resp.body
    _check_setosa(resp.json())
    # The client's id is passed to the service and comes back, once.
    assert resp.headers["x-request-id"] == rid
    assert resp.headers["x-upstream-addr"].endswith(":8000")

    # Without one (or with a malformed one) the proxy generates an id.
    generated = stack.predict()
    assert len(generated.headers["x-request-id"]) >= 16
    hostile = stack.predict(headers={"X-Request-ID": "bad id\twith spaces"})
    assert hostile.status == 200
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"

    batch = http("POST", f"{stack.proxy}/predict/batch", {"instances": [SETOSA, SETOSA]})
    assert batch.status == 200, batch.body
    predictions = batch.json()["predictions"]
    assert [p["predicted_class_name"] for p in predictions] == ["setosa", "setosa"]

    for path in ("/health", "/health/live", "/health/ready", "/model-info"):
        assert http("GET", f"{stack.proxy}{path}").status == 200, path

    # Wrong input is a 4xx with a JSON body, also through the proxy.
    bad = stack.predict({"sepal_length": "a lot"})
    assert 400 <= bad.status < 500
    assert bad.json()

    # A body over the 1 MiB limit stops at the proxy.
    big = http("POST", f"{stack.proxy}/predict/batch", {"instances": [SETOSA] * 20000})
    assert big.status == 413


def test_metrics_refused_at_proxy(stack: Stack) -> None:
    for path in ("/metrics", "/metrics/", "//metrics", "/%6Detrics", "/./metrics", "/METRICS"):
        resp = http("GET", f"{stack.proxy}{path}")
        assert resp.status in (403, 404), (path, resp.status)
        assert b"http_requests_total" not in resp.body, path


def test_prometheus_scrapes_the_api(stack: Stack) -> None:
    def up() -> list[dict[str, Any]]:
        targets = _api_targets(stack)
        return [t for t in targets if t["health"] == "up"]

    targets = wait_for("an api target that is up", up, timeout=90)
    api_ips = {stack.ip(c) for c in stack.containers("api")}
    assert {urllib.parse.urlparse(t["scrapeUrl"]).hostname for t in targets} <= api_ips

    # Requests made above show up as request metrics.
    def requests_metric() -> list[Any]:
        result: list[Any] = _prom(stack, "/api/v1/query", query="http_requests_total")["result"]
        return result

    series = wait_for("http_requests_total in Prometheus", requests_metric, timeout=90)
    assert sum(float(s["value"][1]) for s in series) > 0


def test_container_is_non_root_and_read_only(stack: Stack) -> None:
    (container,) = stack.containers("api")
    info = stack.inspect(container)
    host = info["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert "ALL" in (host["CapDrop"] or [])
    assert any("no-new-privileges" in opt for opt in host["SecurityOpt"] or [])
    assert info["Config"]["User"].split(":")[0] == str(APP_UID)

    def sh(script: str, check: bool = True) -> str:
        return run(["docker", "exec", container, "sh", "-c", script], check=check).stdout.strip()

    assert sh("id -u") == str(APP_UID)
    # Gunicorn is PID 1: it receives docker stop's SIGTERM itself.
    assert "gunicorn" in sh("tr '\\0' ' ' < /proc/1/cmdline")
    assert sh("touch /app/x 2>&1 && echo writable || echo refused").endswith("refused")
    assert sh("touch /opt/venv/x 2>&1 && echo writable || echo refused").endswith("refused")
    assert sh("touch /tmp/x && echo ok") == "ok"
    assert sh("grep -c ' / .*ro[, ]' /proc/mounts || true") != "0"

    # Image labels carry the model version and the bundle checksum.
    labels = run(["docker", "image", "inspect", IMAGE, "--format", "{{json .Config.Labels}}"])
    label = json.loads(labels.stdout)
    assert label["org.opencontainers.image.version"] == MODEL_VERSION
    manifest = json.loads(sh(f"cat /app/artifacts/iris/{MODEL_VERSION}/manifest.json"))
    onnx_sha = manifest["files"]["model.onnx"]
    onnx_sha = onnx_sha["sha256"] if isinstance(onnx_sha, dict) else onnx_sha
    assert label["io.ml-api.model.sha256"] == onnx_sha
    # Docker's own health check (python, no curl) reports healthy.
    assert info["State"]["Health"]["Status"] == "healthy"
    # Only serving: no compilers, no pip caches, no training code or data.
    assert sh("command -v gcc cc || true") == ""
    assert sh("ls -d /app/training /root/.cache /opt/venv/bin/pip 2>/dev/null || true") == ""


def test_scale_to_three_replicas(stack: Stack) -> None:
    t0 = time.monotonic()
    stack.compose("up", "-d", "--wait", "--no-recreate", "--scale", "api=3", "api", timeout=300)
    TIMINGS["scale 1 -> 3 replicas (--wait)"] = time.monotonic() - t0
    containers = stack.containers("api")
    assert len(containers) == 3
    ips = {stack.ip(c) for c in containers}
    assert len(ips) == 3

    # The proxy notices the new addresses (DNS watcher + graceful reload)
    # and spreads requests over all three.
    seen: Counter[str] = Counter()

    def all_answer() -> bool:
        for _ in range(12):
            resp = stack.predict()
            assert resp.status == 200, resp.body
            seen[answering_host(resp.headers["x-upstream-addr"])] += 1
            time.sleep(0.02)
        return set(seen) >= ips

    wait_for("requests answered by all three replicas", all_answer, timeout=60, interval=0.5)
    assert set(seen) <= ips

    # Prometheus scrapes every replica.
    def all_scraped() -> bool:
        up = {
            urllib.parse.urlparse(t["scrapeUrl"]).hostname
            for t in _api_targets(stack)
            if t["health"] == "up"
        }
        return up == ips

    wait_for("Prometheus targets for all three replicas", all_scraped, timeout=90)


def test_stopping_a_replica_under_load_loses_no_request(stack: Stack) -> None:
    containers = stack.containers("api")
    assert len(containers) >= 2, "needs the scaled stack"
    victim = containers[0]
    victim_ip = stack.ip(victim)

    stop = threading.Event()
    lock = threading.Lock()
    results: list[tuple[float, int, str]] = []
    failures: list[str] = []

    def client() -> None:
        # ~20 requests/s per thread, well under the proxy's per-client limit.
        for _ in range(3000):
            if stop.is_set():
                return
            t = time.monotonic()
            try:
                resp = stack.predict(timeout=10)
                ok = resp.status == 200 and resp.json()["predicted_class_name"] == "setosa"
                with lock:
                    results.append((t, resp.status, resp.headers.get("x-upstream-addr", "")))
                    if not ok:
                        failures.append(f"{resp.status} {resp.body[:200]!r}")
            except Exception as exc:
                with lock:
                    failures.append(repr(exc))
            time.sleep(0.05)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for th in threads:
        th.start()
    try:
        time.sleep(2)
        t_stop = time.monotonic()
        run(["docker", "stop", "-t", "30", victim], timeout=60)
        stop_took = time.monotonic() - t_stop
        time.sleep(3)
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=30)

    TIMINGS["docker stop of a replica"] = stop_took
    TIMINGS["requests during the stop test"] = str(len(results))
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    assert len(results) >= 100, f"only {len(results)} requests sent"
    after = [addr for t, _, addr in results if t > t_stop + stop_took]
    assert after, "no request after the replica stopped"
    # A request may still try the stopped replica first (nginx probes a failed
    # peer again after fail_timeout) but another replica answers it.
    assert victim_ip not in {answering_host(addr) for addr in after}

    state = stack.inspect(victim)["State"]
    assert state["Running"] is False
    # SIGTERM -> Gunicorn drains and exits 0 (not killed after the grace period).
    assert state["ExitCode"] == 0, state


KILLS = 5


def test_killed_replicas_requests_are_retried_elsewhere(stack: Stack) -> None:
    """SIGKILL (no draining), five times, each replica brought back before the
    next kill: in-flight and new requests to a dead replica fail at the
    connection or before any byte of an answer (a response leaves a worker in
    one write, so a kill lands before or after a whole one), and nginx
    retries them on another replica. Clients of both kinds (a new connection
    per request, and kept connections) see only 200s."""
    containers = stack.containers("api")
    assert len(containers) >= 2, "needs at least two running replicas"
    # ~15 requests/s a client, ~75 in all: under the proxy's per-address
    # limit (100 r/s), which all of them share.
    with LoadStream(stack.proxy, threads=3, pause=0.06, kept=2) as load:
        time.sleep(1.5)
        for kill in range(KILLS):
            victim = containers[kill % len(containers)]
            run(["docker", "kill", victim], timeout=60)
            time.sleep(2)
            run(["docker", "start", victim], timeout=60)
            wait_for(
                f"replica {victim[:12]} healthy again",
                lambda v=victim: (
                    stack.inspect(v)["State"].get("Health", {}).get("Status") == "healthy"
                ),
                timeout=90,
            )
        wait_for("5,000 requests", lambda: load.sent_total() >= 5000, timeout=120)
    TIMINGS[f"{KILLS} kills: requests"] = str(len(load.results))
    assert not load.failures, load.failures[:5]
    assert len(load.results) >= 5000


def test_prometheus_scrapes_the_proxy(stack: Stack) -> None:
    """The proxy's own metrics (docker/nginx/nginx.conf, port 9113): scraped on the
    compose network, never published on the host, counting what the tests above
    sent through it, the killed replica's retries included."""

    def proxy_target() -> list[dict[str, Any]]:
        data = _prom(stack, "/api/v1/targets", state="active")
        return [t for t in data["activeTargets"] if t["scrapePool"] == "proxy"]

    (target,) = wait_for("the proxy's target", proxy_target, timeout=90)
    assert urllib.parse.urlparse(target["scrapeUrl"]).port == 9113
    (proxy,) = stack.containers("proxy")
    # Only the public listener is published ("8080/tcp -> 127.0.0.1:<port>").
    published = run(["docker", "port", proxy]).stdout.splitlines()
    assert published, "the proxy publishes no port"
    assert all(line.startswith("8080/tcp ") for line in published), published

    def value(query: str) -> float:
        result = _prom(stack, "/api/v1/query", query=query)["result"]
        return sum(float(sample["value"][1]) for sample in result)

    # Once scraped after the tests above: their predictions, their 413 (a body
    # over 1 MiB stopped at the proxy) and the retries of the killed replica's
    # requests on another one.
    queries = {
        'nginx_http_responses_total{route="predict", status="200"}': 100,
        'nginx_http_responses_total{route="predict", status="413"}': 1,
        'nginx_upstream_retries_total{route="predict"}': 1,
    }
    wait_for(
        f"the proxy's counts in Prometheus: {queries}",
        lambda: all(value(query) >= least for query, least in queries.items()),
        timeout=90,
    )
    assert _prom(stack, "/api/v1/query", query='up{job="proxy"}')["result"][0]["value"][1] == "1"
    accepted = value("nginx_connections_accepted")
    assert accepted > 0
    assert value("nginx_connections_handled") == accepted  # none refused
    assert value("nginx_connections_active") >= 1  # Prometheus's own scrape, at least


def test_a_stopped_service_pages_the_receiver_once(stack: Stack) -> None:
    # Last before `down`: it stops every api replica. With the shipped rules and
    # Alertmanager settings (MlApiNoReadyInstance after 1 min, 30 s group wait).
    # Stopped replicas leave compose's DNS, so their targets go (no `up == 0`):
    # the inhibition of MlApiInstanceDown is the process test's to prove.
    stack.compose("stop", "-t", "10", "api", timeout=120)
    assert_paged_once(
        lambda: stack.compose("logs", "--no-color", "--no-log-prefix", "alert-webhook").stdout,
        "MlApiNoReadyInstance",
    )


def test_compose_down(stack: Stack) -> None:
    stack.compose("down", "-v", "--remove-orphans", "-t", "10", timeout=180)
    assert stack.compose("ps", "-a", "-q").stdout.strip() == ""
    networks = run(["docker", "network", "ls", "--format", "{{.Name}}"]).stdout.split()
    assert not [n for n in networks if n.startswith(f"{PROJECT}_")]


@pytest.fixture(autouse=True)
def _show_stack_logs_on_failure(request: pytest.FixtureRequest, stack: Stack) -> Any:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        logs = stack.compose("logs", "--no-color", "--tail", "40", check=False).stdout
        print(f"--- compose logs ({PROJECT})\n{logs}")
