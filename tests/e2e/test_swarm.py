"""The swarm stack (deploy/swarm/) under a steady stream of requests.

One stack for the module, deployed by deploy/swarm/stack.sh (what
`make stack-up` runs) on this engine's swarm, which the script initialises
when there is none and leaves again at the end. All traffic goes to the
proxy on 127.0.0.1. Each scenario reports how many requests it sent; none may
fail: a failure is any answer but a 200 prediction, or a connection error.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.support import (
    DOCKER_DIR,
    IMAGE,
    MODEL_VERSION,
    ROOT,
    TIMINGS,
    LoadStream,
    free_port,
    http,
    run,
)

STACK = os.environ.get("E2E_SWARM_STACK", "ml-api-e2e")
STACK_SH = ROOT / "deploy" / "swarm" / "stack.sh"
IMAGE_NAME = IMAGE.split(":")[0]
NEXT_VERSION = "1.1.0"
UNSERVABLE_VERSION = "1.2.0"


@dataclass
class Swarm:
    env: dict[str, str]
    proxy: str
    prometheus: str

    def stack(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([str(STACK_SH), *args], env=self.env, check=check, timeout=600)

    def image(self) -> str:
        out = run(
            [
                "docker",
                "service",
                "inspect",
                f"{STACK}_api",
                "--format",
                "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
            ]
        )
        return out.stdout.strip()

    def task_addresses(self) -> set[str]:
        """Backend addresses of the api tasks that are running (= healthy)."""
        ids = run(
            ["docker", "service", "ps", "-q", "--filter", "desired-state=running", f"{STACK}_api"]
        ).stdout.split()
        if not ids:
            return set()
        tasks: list[dict[str, Any]] = json.loads(run(["docker", "inspect", *ids]).stdout)
        addresses: set[str] = set()
        for task in tasks:
            if task["Status"]["State"] != "running":
                continue
            for attachment in task.get("NetworksAttachments") or []:
                if attachment["Network"]["Spec"]["Name"] == f"{STACK}_backend":
                    addresses.update(a.split("/")[0] for a in attachment["Addresses"])
        return addresses

    def scraped_addresses(self) -> set[str]:
        resp = http("GET", f"{self.prometheus}/api/v1/targets?state=active")
        if resp.status != 200:
            return set()
        return {
            str(urllib.parse.urlparse(t["scrapeUrl"]).hostname)
            for t in resp.json()["data"]["activeTargets"]
            if t["labels"].get("job") == "ml-api" and t["health"] == "up"
        }


def _build(env: dict[str, str], version: str, **extra: str) -> None:
    t0 = time.monotonic()
    run(
        [str(DOCKER_DIR / "build-image.sh")],
        env={**env, "MODEL_VERSION": version, **extra},
        timeout=900,
        capture=False,
    )
    TIMINGS[f"image build {extra.get('IMAGE_TAG', version)}"] = time.monotonic() - t0


def _swarm_state() -> str:
    return run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"]).stdout.strip()


@pytest.fixture(scope="module")
def swarm(image: str, base_images: dict[str, str]) -> Iterator[Swarm]:
    env = {
        **os.environ,
        **base_images,
        "STACK_NAME": STACK,
        "IMAGE_NAME": IMAGE_NAME,
        "MODEL_VERSION": MODEL_VERSION,
        "PROXY_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "GRAFANA_PORT": str(free_port()),
        # The tests need no dashboards; without a registry there is no image.
        "GRAFANA_REPLICAS": "0",
        "API_REPLICAS": "3",
        "BACKEND_SUBNET": os.environ.get("E2E_SWARM_SUBNET", "10.232.9.0/24"),
    }
    _build(env, NEXT_VERSION)
    _build(env, UNSERVABLE_VERSION, BREAK_BUNDLE="1", IMAGE_TAG=f"{UNSERVABLE_VERSION}-unservable")
    sw = Swarm(
        env=env,
        proxy=f"http://127.0.0.1:{env['PROXY_PORT']}",
        prometheus=f"http://127.0.0.1:{env['PROMETHEUS_PORT']}",
    )
    state_before = _swarm_state()
    TIMINGS["swarm before the tests"] = state_before
    t0 = time.monotonic()
    try:
        sw.stack("up")
        TIMINGS["swarm: stack up -> ready"] = time.monotonic() - t0
        yield sw
    finally:
        if os.environ.get("E2E_KEEP_STACK") != "1":
            sw.stack("down", check=False)
            volumes = run(
                [
                    "docker",
                    "volume",
                    "ls",
                    "-q",
                    "--filter",
                    f"label=com.docker.stack.namespace={STACK}",
                ],
                check=False,
            ).stdout.split()
            if volumes:
                run(["docker", "volume", "rm", *volumes], check=False)
        TIMINGS["swarm after the tests"] = _swarm_state()


def _wait_for(what: str, check: Any, timeout: float = 90, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def _assert_targets_are_the_tasks(sw: Swarm, replicas: int) -> None:
    def same() -> tuple[set[str], set[str]] | None:
        tasks, scraped = sw.task_addresses(), sw.scraped_addresses()
        return (tasks, scraped) if len(tasks) == replicas and tasks == scraped else None

    _wait_for(f"Prometheus targets == the {replicas} running api tasks", same)


def _report(name: str, load: LoadStream) -> None:
    TIMINGS[f"swarm {name}: requests sent/failed"] = f"{len(load.results)}/{len(load.failures)}"
    assert not load.failures, (
        f"{len(load.failures)} of {len(load.results)} requests failed: {load.failures[:5]}"
    )


# ------------------------------------------------------------------ tests ---


def test_stack_serves_through_the_proxy(swarm: Swarm) -> None:
    resp = http(
        "POST",
        f"{swarm.proxy}/predict",
        {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    )
    assert resp.status == 200, resp.body
    assert resp.json()["model_version"] == MODEL_VERSION
    assert swarm.image() == IMAGE
    _assert_targets_are_the_tasks(swarm, 3)


def test_rolling_update_loses_no_request_and_ends_on_the_new_version(swarm: Swarm) -> None:
    with LoadStream(swarm.proxy) as load:
        time.sleep(2)
        t0 = time.monotonic()
        done = swarm.stack("rollout", NEXT_VERSION, check=False)
        converged = time.monotonic()
        TIMINGS["swarm rolling update 1.0.0 -> 1.1.0"] = converged - t0
        time.sleep(3)
    assert done.returncode == 0, done.stderr
    _report("rolling update", load)
    assert swarm.image() == f"{IMAGE_NAME}:{NEXT_VERSION}"
    # Both versions answered during the update; only the new one after it.
    assert load.versions_since(t0) >= {MODEL_VERSION, NEXT_VERSION}
    assert load.versions_since(converged) == {NEXT_VERSION}
    assert len([r for r in load.results if r[0] >= converged]) > 0
    _assert_targets_are_the_tasks(swarm, 3)


def test_unservable_image_is_rolled_back_without_a_failed_request(swarm: Swarm) -> None:
    with LoadStream(swarm.proxy) as load:
        time.sleep(2)
        t0 = time.monotonic()
        done = swarm.stack("rollout", f"{UNSERVABLE_VERSION}-unservable", check=False)
        TIMINGS["swarm update to an unservable image -> rolled back"] = time.monotonic() - t0
        time.sleep(2)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "rolled back" in done.stderr
    _report("rollback of an unservable image", load)
    assert swarm.image() == f"{IMAGE_NAME}:{NEXT_VERSION}"
    assert load.versions_since(0) == {NEXT_VERSION}
    _assert_targets_are_the_tasks(swarm, 3)


def test_scaling_under_load_loses_no_request(swarm: Swarm) -> None:
    with LoadStream(swarm.proxy) as load:
        time.sleep(2)
        swarm.stack("scale", "5")
        _assert_targets_are_the_tasks(swarm, 5)
        swarm.stack("scale", "2")
        _assert_targets_are_the_tasks(swarm, 2)
        time.sleep(2)
    _report("scale 3 -> 5 -> 2", load)
    assert load.versions_since(0) == {NEXT_VERSION}


def test_stack_down_leaves_the_engine_as_found(swarm: Swarm) -> None:
    before = TIMINGS["swarm before the tests"]
    swarm.stack("down")
    assert _swarm_state() == before
    leftovers = run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}"]
    ).stdout.split()
    assert not leftovers
