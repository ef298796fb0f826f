"""Helpers of the swarm tests (test_swarm.py, test_swarm_two_nodes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.auth import keyfile
from tests.e2e.support import (
    ALERT_RECEIVER,
    DOCKER_DIR,
    IMAGE,
    ROOT,
    SETOSA,
    TIMINGS,
    LoadStream,
    Response,
    free_port,
    http,
    run,
    wait_for,
)

STACK_SH = ROOT / "deploy" / "swarm" / "stack.sh"
SECOND_NODE_SH = ROOT / "deploy" / "swarm" / "second-node.sh"
IMAGE_NAME = IMAGE.split(":")[0]
NEXT_VERSION = "1.1.0"
UNSERVABLE_VERSION = "1.2.0"


def keys_file(stack: str) -> Path:
    return Path(f"/tmp/{stack}-api-keys")


def add_key(path: Path, key_id: str) -> str:
    key = keyfile.mint_key()
    keyfile.update(path, add=keyfile.StoredKey(key_id, keyfile.digest_of(key)))
    return key


def stack_env(base_images: dict[str, str], stack: str, model_version: str) -> dict[str, str]:
    return {
        **os.environ,
        **base_images,
        "STACK_NAME": stack,
        "IMAGE_NAME": IMAGE_NAME,
        "MODEL_VERSION": model_version,
        "PROXY_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "ALERTMANAGER_PORT": str(free_port()),
        "GRAFANA_PORT": str(free_port()),
        # The tests need no dashboards; without a registry there is no image.
        "GRAFANA_REPLICAS": "0",
        "API_REPLICAS": "3",
        # The swarm secret's source (Swarm.__post_init__ writes it).
        "API_KEYS_FILE": str(keys_file(stack)),
        # Which replica answered: the tests count replicas by it.
        "PROXY_UPSTREAM_ADDR_HEADER": "on",
    }


@dataclass
class Swarm:
    """A stack with API keys on, as in production: one key, which every
    request through the proxy carries."""

    stack_name: str
    env: dict[str, str]
    proxy: str = field(init=False)
    prometheus: str = field(init=False)
    alertmanager: str = field(init=False)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.proxy = f"http://127.0.0.1:{self.env['PROXY_PORT']}"
        self.prometheus = f"http://127.0.0.1:{self.env['PROMETHEUS_PORT']}"
        self.alertmanager = f"http://127.0.0.1:{self.env['ALERTMANAGER_PORT']}"
        path = Path(self.env["API_KEYS_FILE"])
        path.unlink(missing_ok=True)
        self.key = add_key(path, "e2e-swarm")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def predict(self, headers: dict[str, str] | None = None) -> Response:
        return http(
            "POST",
            f"{self.proxy}/predict",
            SETOSA,
            headers=self.headers if headers is None else headers,
        )

    def load(self) -> LoadStream:
        # New-connection clients and clients that keep their connections:
        # neither may lose a request while the stack changes.
        return LoadStream(self.proxy, headers=self.headers, kept=2)

    def stack(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([str(STACK_SH), *args], env=self.env, check=check, timeout=600)

    def image(self) -> str:
        out = run(
            [
                "docker",
                "service",
                "inspect",
                f"{self.stack_name}_api",
                "--format",
                "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
            ]
        )
        return out.stdout.strip()

    def task_containers(self, service: str) -> list[str]:
        """The ids of the containers running `service`'s tasks on this node."""
        label = f"label=com.docker.swarm.service.name={self.stack_name}_{service}"
        return sorted(run(["docker", "ps", "-q", "--filter", label]).stdout.split())

    def kill_key_follower(self, container: str) -> list[int]:
        """SIGKILLs the `key_sync follow` processes in `container`: found by
        their command lines under /proc, killed by pid."""
        script = (
            "import os, signal\n"
            "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n"
            "        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
            "    except OSError:\n"
            "        continue\n"
            "    if b'service.auth.key_sync' in argv and b'follow' in argv:\n"
            "        os.kill(int(pid), signal.SIGKILL)\n"
            "        print(pid)\n"
        )
        out = run(["docker", "exec", container, "python3", "-c", script]).stdout
        return [int(pid) for pid in out.split()]

    def tasks(self) -> dict[str, str]:
        """Backend address -> node ID of the api tasks that are running (= healthy)."""
        ids = run(
            [
                "docker",
                "service",
                "ps",
                "-q",
                "--filter",
                "desired-state=running",
                f"{self.stack_name}_api",
            ]
        ).stdout.split()
        if not ids:
            return {}
        found: list[dict[str, Any]] = json.loads(run(["docker", "inspect", *ids]).stdout)
        addresses: dict[str, str] = {}
        for task in found:
            if task["Status"]["State"] != "running":
                continue
            for attachment in task.get("NetworksAttachments") or []:
                if attachment["Network"]["Spec"]["Name"] == f"{self.stack_name}_backend":
                    for address in attachment["Addresses"]:
                        addresses[address.split("/")[0]] = task["NodeID"]
        return addresses

    def _prometheus(self, path: str) -> Any:
        """Prometheus's answer's data, or None while it does not answer (a
        rollout restarts it onto the new drift rules)."""
        try:
            resp = http("GET", f"{self.prometheus}{path}")
        except OSError:
            return None
        return resp.json()["data"] if resp.status == 200 else None

    def drift_rule_versions(self) -> set[str]:
        """The model versions the loaded drift rules are for."""
        data = self._prometheus("/api/v1/rules")
        if data is None:
            return set()
        return {
            rule["labels"]["version"]
            for group in data["groups"]
            for rule in group["rules"]
            if "version" in rule.get("labels", {})
        }

    def scraped_addresses(self) -> set[str]:
        data = self._prometheus("/api/v1/targets?state=active")
        if data is None:
            return set()
        return {
            str(urllib.parse.urlparse(t["scrapeUrl"]).hostname)
            for t in data["activeTargets"]
            if t["labels"].get("job") == "ml-api" and t["health"] == "up"
        }


def build_image(env: dict[str, str], version: str, **extra: str) -> None:
    t0 = time.monotonic()
    run(
        [str(DOCKER_DIR / "build-image.sh")],
        env={**env, "MODEL_VERSION": version, **extra},
        timeout=900,
        capture=False,
    )
    # The first build of a tag is the one that did the work.
    TIMINGS.setdefault(f"image build {extra.get('IMAGE_TAG', version)}", time.monotonic() - t0)


def swarm_state() -> str:
    return run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"]).stdout.strip()


def assert_targets_are_the_tasks(sw: Swarm, replicas: int) -> None:
    def same() -> tuple[set[str], set[str]] | None:
        tasks, scraped = set(sw.tasks()), sw.scraped_addresses()
        return (tasks, scraped) if len(tasks) == replicas and tasks == scraped else None

    wait_for(f"Prometheus targets == the {replicas} running api tasks", same)


def proxy_retries(sw: Swarm, since: float) -> tuple[int, int]:
    """(predictions the proxy logged, how many of them nginx had to retry on
    another replica) since a Unix time: a retry shows as several upstreams."""
    logs = run(
        [
            "docker",
            "service",
            "logs",
            "--raw",
            "--since",
            str(int(since)),
            f"{sw.stack_name}_proxy",
        ],
        check=False,
    ).stdout
    logged = retried = 0
    for line in logs.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("uri") != "/predict":
            continue
        logged += 1
        retried += "," in str(entry.get("upstream_addr", ""))
    return logged, retried


def report(name: str, load: LoadStream, sw: Swarm | None = None, since: float = 0.0) -> None:
    TIMINGS[f"{name}: requests sent/failed"] = (
        f"{load.sent['new']}/{load.failed['new']} new connections, "
        f"{load.sent['kept']}/{load.failed['kept']} kept connections"
    )
    if sw is not None:
        logged, retried = proxy_retries(sw, since)
        TIMINGS[f"{name}: retried by nginx"] = f"{retried} of {logged}"
    assert not load.failures, (
        f"{len(load.failures)} of {len(load.results)} requests failed: {load.failures[:5]}"
    )


@contextmanager
def alert_receiver(sw: Swarm) -> Iterator[str]:
    """The webhook the shipped Alertmanager configuration sends to
    (alert-webhook:9095): alert_receiver.py, as alert-receiver.yaml runs it
    beside the compose stack, here a plain container on the stack's
    attachable edge network under that name. Yields the container's name;
    removed on the way out (it would keep the network from going)."""
    name = f"{sw.stack_name}_alert-webhook"
    run(["docker", "rm", "-f", name], check=False)
    run(
        [
            "docker",
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            f"{sw.stack_name}_edge",
            "--network-alias",
            "alert-webhook",
            "--user",
            "65534:65534",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--mount",
            f"type=bind,source={ALERT_RECEIVER},target=/receiver/alert_receiver.py,readonly",
            sw.env["PYTHON_BASE_IMAGE"],
            "python3",
            "-u",
            "/receiver/alert_receiver.py",
        ]
    )
    try:
        yield name
    finally:
        run(["docker", "rm", "-f", name], check=False)


def remove_stack(sw: Swarm) -> None:
    """stack.sh down (leaves the swarm if up created it) and the stack's volumes."""
    if os.environ.get("E2E_KEEP_STACK") == "1":
        return
    sw.stack("down", check=False)
    remove_stack_volumes(sw.stack_name)


def remove_stack_volumes(stack_name: str) -> None:
    """The stack's volumes, once no container of it is left to hold them.

    Also before a stack comes up: Alertmanager's volume keeps its notification
    log, and a log left by an earlier run that paged for the same alert keeps
    this run's page from being sent (its repeat interval has not passed)."""
    label = f"label=com.docker.stack.namespace={stack_name}"

    def containers_gone() -> bool:
        return not run(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split()

    wait_for(f"the containers of {stack_name} to go", containers_gone, timeout=90)
    volumes = run(["docker", "volume", "ls", "-q", "--filter", label], check=False).stdout.split()
    if volumes:
        run(["docker", "volume", "rm", *volumes])
