"""Overload: far more keep-alive connections than the workers can serve
(wrk -c1000 on /predict), ml-api's worker beside the stock
`uvicorn_worker.UvicornWorker` serving the same app in the same run.

Reported per server: the p99 and the longest wait of the requests that were
answered (wrk counts only those), the client timeouts and 503s, and the
latency of /health/live from a new connection every 0.2 s throughout, as a
container health check or a liveness probe makes it. Run alone with
`python -m bench.run --only-overload`.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench import run

ML_API = "ml-api"
STOCK = "ml-api-on-stock-uvicorn-worker"
# Gunicorn reads GUNICORN_CMD_ARGS after gunicorn.conf.py: only the worker class changes.
# A client waiting longer than this has given up (the measure).
CLIENT_TIMEOUT_SECONDS = 10
HEALTH_EVERY_SECONDS = 0.2


def _health_probe(
    url: str, stop: threading.Event, seconds: list[float], failures: list[str]
) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        try:
            # A new connection each time, as a probe makes it.
            status = httpx.get(f"{url}/health/live", timeout=CLIENT_TIMEOUT_SECONDS).status_code
            if status != 200:
                failures.append(str(status))
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)
        seconds.append(time.perf_counter() - began)
        stop.wait(HEALTH_EVERY_SECONDS)


def overload_round(
    wrk: str, server: run.Server, script: Path, seconds: int, connections: int
) -> dict[str, Any]:
    *options, url = run.wrk_command(wrk, server, script, "/predict", seconds, connections)
    command = [*options, f"--timeout={CLIENT_TIMEOUT_SECONDS}s", url]
    stop = threading.Event()
    health: list[float] = []
    health_failures: list[str] = []
    probe = threading.Thread(target=_health_probe, args=(server.url, stop, health, health_failures))
    probe.start()
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        ).stdout
    finally:
        stop.set()
        probe.join()
    latency = dict(re.findall(r"^\s*(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    longest = re.search(r"^\s*Latency\s+\S+\s+\S+\s+(\S+)", out, re.MULTILINE)
    answered = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    timeouts = re.search(r"Socket errors: .*timeout (\d+)", out)
    if not latency or longest is None or answered is None:
        raise RuntimeError(f"wrk against {server.name} printed no latencies:\n{out}")
    return {
        "answered": int(answered.group(1)),
        "p50_ms": run._ms(latency["50"]),
        "p99_ms": run._ms(latency["99"]),
        "max_wait_ms": run._ms(longest.group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "client_timeouts": int(timeouts.group(1)) if timeouts else 0,
        "health_checks": len(health),
        "health_max_ms": max(health) * 1000 if health else None,
        "health_median_ms": statistics.median(health) * 1000 if health else None,
        "health_over_1s": sum(1 for s in health if s > 1),
        "health_failures": health_failures,
    }


def compare(
    wrk: str, work: Path, bundle: Path, workers: int, seconds: int, connections: int
) -> dict[str, dict[str, Any]]:
    """One overload round each, servers started together and measured one after the other."""
    # Built here, not at import: bench.run imports this module from its top.
    specs = {ML_API: run.ServerSpec(), STOCK: run.ServerSpec(env=run.STOCK_WORKER)}
    servers = run.start_all(specs, work, bundle, workers)
    try:
        script = run.wrk_script(work, "/predict", json.dumps(run.SETOSA).encode())
        return {
            name: overload_round(wrk, server, script, seconds, connections)
            for name, server in servers.items()
        }
    finally:
        for server in servers.values():
            server.stop()


def table(results: dict[str, dict[str, Any]], connections: int) -> str:
    lines = [
        f"overload: wrk -c{connections} on /predict, client timeout {CLIENT_TIMEOUT_SECONDS} s",
        f"{'server':<32}{'answered':>9}{'p99 ms':>9}{'max ms':>9}{'503s':>7}{'timeouts':>9}"
        f"{'health max ms':>14}{'health >1s':>11}{'health failed':>14}",
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<32}{r['answered']:>9}{r['p99_ms']:>9.0f}{r['max_wait_ms']:>9.0f}"
            f"{r['non_2xx']:>7}{r['client_timeouts']:>9}{r['health_max_ms'] or 0:>14.0f}"
            f"{r['health_over_1s']:>11}{len(r['health_failures']):>14}"
        )
    return "\n".join(lines)


def targets(results: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    ours, stock = results[ML_API], results[STOCK]
    return {
        "overload: p99 of answered <= 2x the stock worker's": [
            round(ours["p99_ms"] / stock["p99_ms"], 2),
            ours["p99_ms"] <= 2 * stock["p99_ms"],
        ],
        "overload: no client timeout": [ours["client_timeouts"], ours["client_timeouts"] == 0],
        "overload: /health/live within 1 s throughout": [
            round(ours["health_max_ms"] or 0),
            ours["health_over_1s"] == 0 and not ours["health_failures"],
        ],
    }
