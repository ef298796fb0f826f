"""The swarm stack (deploy/swarm/) under a steady stream of requests.

One stack for the module, deployed by deploy/swarm/stack.sh (what
`make stack-up` runs) on this engine's swarm, which the script initialises
when there is none and leaves again at the end. All traffic goes to the
proxy on 127.0.0.1. Each scenario reports how many requests it sent; none may
fail: a failure is any answer but a 200 prediction, or a connection error.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.auth import keyfile
from tests.e2e.support import (
    IMAGE,
    MODEL_VERSION,
    TIMINGS,
    LoadStream,
    assert_paged_once,
    http,
    run,
    wait_for,
)
from tests.e2e.swarm_support import (
    IMAGE_NAME,
    NEXT_VERSION,
    UNSERVABLE_VERSION,
    Swarm,
    add_key,
    alert_receiver,
    assert_targets_are_the_tasks,
    build_image,
    remove_stack,
    remove_stack_volumes,
    report,
    stack_env,
    swarm_state,
)

# ioctl(2) for an interface's flags and IPv4 address (linux/sockios.h, if.h).
SIOCGIFFLAGS, SIOCGIFADDR, IFF_UP = 0x8913, 0x8915, 0x1
STACK = os.environ.get("E2E_SWARM_STACK", "ml-api-e2e")


@pytest.fixture(scope="module")
def swarm(image: str, base_images: dict[str, str]) -> Iterator[Swarm]:
    env = stack_env(base_images, STACK, MODEL_VERSION)
    env["BACKEND_SUBNET"] = os.environ.get("E2E_SWARM_SUBNET", "10.232.9.0/24")
    build_image(env, NEXT_VERSION)
    build_image(
        env, UNSERVABLE_VERSION, BREAK_BUNDLE="1", IMAGE_TAG=f"{UNSERVABLE_VERSION}-unservable"
    )
    sw = Swarm(STACK, env)
    remove_stack_volumes(STACK)
    TIMINGS["swarm before the tests"] = swarm_state()
    t0 = time.monotonic()
    try:
        sw.stack("up")
        TIMINGS["swarm: stack up -> ready"] = time.monotonic() - t0
        yield sw
    finally:
        remove_stack(sw)
        TIMINGS["swarm after the tests"] = swarm_state()


# ------------------------------------------------------------------ tests ---


def test_stack_serves_through_the_proxy(swarm: Swarm) -> None:
    resp = swarm.predict()
    assert resp.status == 200, resp.body
    # The keys secret reaches the api: without a key, 401.
    assert swarm.predict(headers={}).status == 401
    assert resp.json()["model_version"] == MODEL_VERSION
    assert swarm.image() == IMAGE
    assert_targets_are_the_tasks(swarm, 3)


def _host_address() -> str:
    """An IPv4 address of this host that is not loopback, from the interfaces
    themselves: the default bridge's IPAM entry, asked before, once came back
    without a gateway in a CI rehearsal."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                flags = fcntl.ioctl(probe.fileno(), SIOCGIFFLAGS, request)
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            up = struct.unpack_from("H", flags, 16)[0] & IFF_UP
            address = socket.inet_ntoa(answer[20:24])
            if up and not address.startswith("127."):
                return address
    raise AssertionError("this host has no IPv4 address but loopback")


def _connects(address: str, port: str) -> bool:
    try:
        with socket.create_connection((address, int(port)), timeout=3):
            return True
    except OSError:
        return False


def test_monitoring_answers_on_the_managers_loopback_only(swarm: Swarm) -> None:
    """Prometheus, Alertmanager and Grafana publish no port on the swarm;
    the monitoring door publishes them on the manager's loopback."""
    for name in ("prometheus", "alertmanager", "grafana"):
        [service] = json.loads(run(["docker", "service", "inspect", f"{STACK}_{name}"]).stdout)
        assert not service["Spec"].get("EndpointSpec", {}).get("Ports"), name
        assert not service.get("Endpoint", {}).get("Ports"), name
    [door] = json.loads(run(["docker", "inspect", f"{STACK}_monitoring-door"]).stdout)
    bound = {b["HostIp"] for v in door["HostConfig"]["PortBindings"].values() for b in v}
    assert bound == {"127.0.0.1"}
    # Prometheus and Alertmanager themselves answer through the door (what
    # Grafana's port leads to is the same proxy; the tests run without a
    # Grafana image).
    assert http("GET", f"{swarm.prometheus}/-/ready").status == 200
    assert http("GET", f"{swarm.alertmanager}/-/ready").status == 200
    assert _connects("127.0.0.1", swarm.env["GRAFANA_PORT"])
    address = _host_address()
    # The proxy is published on every interface (swarm's host mode): the
    # address is reachable; the monitoring services are not, there.
    assert _connects(address, swarm.env["PROXY_PORT"])
    for port in ("PROMETHEUS_PORT", "ALERTMANAGER_PORT", "GRAFANA_PORT"):
        assert not _connects(address, swarm.env[port]), port


def test_api_tasks_are_non_root_read_only_and_without_capabilities(swarm: Swarm) -> None:
    containers = run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_api"]
    ).stdout.split()
    assert len(containers) == 3
    info = json.loads(run(["docker", "inspect", *containers]).stdout)
    for container in info:
        assert container["HostConfig"]["ReadonlyRootfs"] is True
        assert "ALL" in (container["HostConfig"]["CapDrop"] or [])
        assert container["Config"]["User"].split(":")[0] == "10001"
        assert container["State"]["Health"]["Status"] == "healthy"


def test_rolling_update_loses_no_request_and_ends_on_the_new_version(swarm: Swarm) -> None:
    since = time.time()
    with swarm.load() as load:
        time.sleep(2)
        t0 = time.monotonic()
        done = swarm.stack("rollout", NEXT_VERSION, check=False)
        converged = time.monotonic()
        TIMINGS["swarm rolling update 1.0.0 -> 1.1.0"] = converged - t0
        time.sleep(3)
    assert done.returncode == 0, done.stderr
    report("swarm rolling update", load, swarm, since)
    assert swarm.image() == f"{IMAGE_NAME}:{NEXT_VERSION}"
    # Both versions answered during the update; only the new one after it.
    assert load.versions_since(t0) >= {MODEL_VERSION, NEXT_VERSION}
    assert load.versions_since(converged) == {NEXT_VERSION}
    assert len([r for r in load.results if r[0] >= converged]) > 0
    # Prometheus evaluates the new version's drift rules (from its image).
    assert "Prometheus loads the drift rules of" in done.stderr
    wait_for(
        "the drift rules of the new version",
        lambda: swarm.drift_rule_versions() == {NEXT_VERSION},
        timeout=90,
    )
    assert_targets_are_the_tasks(swarm, 3)


def test_unservable_image_is_rolled_back_without_a_failed_request(swarm: Swarm) -> None:
    since = time.time()
    with swarm.load() as load:
        time.sleep(2)
        t0 = time.monotonic()
        done = swarm.stack("rollout", f"{UNSERVABLE_VERSION}-unservable", check=False)
        TIMINGS["swarm update to an unservable image -> rolled back"] = time.monotonic() - t0
        time.sleep(2)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "rolled back" in done.stderr
    # Why, as the failed task's log has it (docker/first_error.py): the
    # bundle's checksums do not match (BREAK_BUNDLE).
    [failed] = [line for line in done.stderr.splitlines() if line.startswith("[stack] failed: ")]
    assert f"({IMAGE_NAME}:{UNSERVABLE_VERSION}-unservable, failed " in failed, failed
    assert "checksum mismatch: model." in failed, failed
    TIMINGS["swarm rollback: the reason printed"] = failed.removeprefix("[stack] failed: ")[:150]
    report("swarm rollback of an unservable image", load, swarm, since)
    assert swarm.image() == f"{IMAGE_NAME}:{NEXT_VERSION}"
    assert load.versions_since(0) == {NEXT_VERSION}
    assert_targets_are_the_tasks(swarm, 3)


def test_scaling_under_load_loses_no_request(swarm: Swarm) -> None:
    since = time.time()
    with swarm.load() as load:
        time.sleep(2)
        swarm.stack("scale", "5")
        assert_targets_are_the_tasks(swarm, 5)
        swarm.stack("scale", "2")
        assert_targets_are_the_tasks(swarm, 2)
        time.sleep(2)
    report("swarm scale 3 -> 5 -> 2", load, swarm, since)
    assert load.versions_since(0) == {NEXT_VERSION}


def _live_after(log: str) -> str:
    """stack.sh keys' own measure: from its start until every copy on this node held the keys."""
    found = re.search(r"after (\d+(?:\.\d)? s) \(no restart\)", log)
    assert found, log
    # The running keys task served the new file at once (no wait for swarm).
    assert "pushed into the running" in log, log
    return found.group(1)


def test_key_rotation_reaches_api_and_proxy_without_a_refused_key(swarm: Swarm) -> None:
    """stack.sh keys (make stack-keys): a new secret for the `keys` service
    alone; the api tasks and the proxy copy it in place. Under new-connection
    and keep-alive clients no request fails (no refused connection, no 401
    for a key in both sets), and when stack.sh returns the added key works,
    and once revoked is refused, on every request: through every api task and
    the proxy's rate-limit bucket, whose key follower was killed first."""
    path = Path(swarm.env["API_KEYS_FILE"])
    new = {"Authorization": f"Bearer {add_key(path, 'e2e-rotated')}"}
    assert swarm.predict(headers=new).status == 401  # not rotated in yet
    since = time.time()
    proxy_before = swarm.task_containers("proxy")
    # A follower killed is started again (a copy nobody follows would keep
    # every key revoked from then on): stack.sh keys waits for the proxy's copy.
    assert len(swarm.kill_key_follower(proxy_before[0])) == 1
    with swarm.load() as load:
        time.sleep(2)
        t0 = time.monotonic()
        done = swarm.stack("keys")
        TIMINGS["swarm key rotation (add)"] = time.monotonic() - t0
        TIMINGS["swarm key rotation (add): live after"] = _live_after(done.stderr)
        added = [swarm.predict(headers=new).status for _ in range(30)]
        keyfile.update(path, revoke="e2e-rotated")
        t0 = time.monotonic()
        done = swarm.stack("keys")
        TIMINGS["swarm key rotation (revoke)"] = time.monotonic() - t0
        TIMINGS["swarm key rotation (revoke): live after"] = _live_after(done.stderr)
        # Fewer than the proxy's burst for requests without a valid key (10),
        # which a revoked key is: each one reaches a replica and gets its 401.
        revoked = [swarm.predict(headers=new).status for _ in range(8)]
        time.sleep(2)
    report("swarm key rotations", load, swarm, since)
    assert set(added) == {200}, added
    assert set(revoked) == {401}, revoked
    # Nothing restarted: the same proxy container served throughout.
    assert swarm.task_containers("proxy") == proxy_before
    # The proxy knew the new key: it had a bucket of its own.
    logs = run(
        ["docker", "service", "logs", "--raw", "--since", str(int(since)), f"{STACK}_proxy"]
    ).stdout
    assert '"key_id":"e2e-rotated"' in logs
    # The entrypoint's own lines: the container's stderr.
    entrypoint = run(["docker", "logs", "--since", str(int(since)), proxy_before[0]]).stderr
    assert '"event":"api_keys_follower_restarted","exit":137' in entrypoint
    secrets = run(["docker", "secret", "ls", "-q", "--filter", f"name={STACK}-api-keys"])
    assert len(secrets.stdout.split()) == 1


# Seconds of traffic at each canary share, at ~40 requests/s: a share's
# binomial spread is 1.1 points at 10 % (800 answers) and 1.3 at 50 % (1,600),
# so +-5 is 4 of them or more.
CANARY_WINDOW = {10: 20.0, 50: 40.0}


def test_canary_gets_its_share_then_is_promoted_without_a_failed_request(swarm: Swarm) -> None:
    """stack.sh canary / promote / canary-off (make stack-canary ...) under
    ~40 requests/s from new-connection clients and clients that keep their
    connections: the proxy's split follows each weight (read in place, no
    reload), and the candidate serves everything once promoted. The primary
    runs 1.1.0 by now (the rolling update); the candidate is the 1.0.0 image."""
    primary, candidate = NEXT_VERSION, MODEL_VERSION
    assert swarm.image() == f"{IMAGE_NAME}:{primary}"
    shares: dict[int, float] = {}
    since = time.time()
    with LoadStream(swarm.proxy, threads=4, pause=0.08, headers=swarm.headers, kept=2) as load:
        started = time.monotonic()
        time.sleep(2)
        for percent, version in ((10, candidate), (50, "")):
            swarm.stack("canary", *([version] if version else []), str(percent))
            t0 = time.monotonic()
            time.sleep(CANARY_WINDOW[percent])
            answered = load.answered_between(t0, time.monotonic())
            shares[percent] = 100 * answered.count(candidate) / len(answered)
            TIMINGS[f"swarm canary {percent} %: share from the candidate"] = (
                f"{shares[percent]:.1f} % of {len(answered)}"
            )
            assert set(answered) == {primary, candidate}
        swarm.stack("canary-off")
        off = time.monotonic()
        time.sleep(3)
        after_off = set(load.answered_between(off, time.monotonic()))
        swarm.stack("canary", candidate, "50")
        t0 = time.monotonic()
        swarm.stack("promote")
        TIMINGS["swarm canary promote"] = time.monotonic() - t0
        promoted = time.monotonic()
        time.sleep(3)
        TIMINGS["swarm canary: requests/s"] = (
            f"{len(load.results) / (time.monotonic() - started):.0f}"
        )
    report("swarm canary 10 % -> 50 % -> off -> 50 % -> promote", load, swarm, since)
    for percent, share in shares.items():
        assert abs(share - percent) <= 5, (percent, share)
    assert after_off == {primary}
    assert load.versions_since(promoted) == {candidate}
    assert swarm.image() == f"{IMAGE_NAME}:{candidate}"
    replicas = run(
        [
            "docker",
            "service",
            "inspect",
            f"{STACK}_canary",
            "--format",
            "{{.Spec.Mode.Replicated.Replicas}}",
        ]
    ).stdout.strip()
    assert replicas == "0"


def test_a_stopped_service_pages_the_receiver_once(swarm: Swarm) -> None:
    """Prometheus on the swarm loads the shipped rules and sends to the
    stack's Alertmanager, which pages the receiver of the shipped
    configuration once, as on compose (test_stack.py). Last before `down`: it
    scales the api to 0; its tasks leave DNS, so their targets go."""
    with alert_receiver(swarm) as receiver:
        swarm.stack("scale", "0")
        arrived = assert_paged_once(
            lambda: run(["docker", "logs", receiver]).stdout, "MlApiNoReadyInstance"
        )
    TIMINGS["swarm: api at 0 replicas -> page at the receiver"] = arrived
    # Alertmanager keeps what it sent in its Swarm-only volume.
    [volume] = [
        m for m in _task_container("alertmanager")["Mounts"] if m["Destination"] == "/alertmanager"
    ]
    assert volume["Name"] == f"{STACK}_swarm-alertmanager-data"


def _task_container(service: str) -> dict[str, Any]:
    [container] = run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_{service}"]
    ).stdout.split()
    info: dict[str, Any] = json.loads(run(["docker", "inspect", container]).stdout)[0]
    return info


def test_stack_down_leaves_the_engine_as_found(swarm: Swarm) -> None:
    before = TIMINGS["swarm before the tests"]
    swarm.stack("down")
    assert swarm_state() == before
    leftovers = run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={STACK}"]
    ).stdout.split()
    assert not leftovers
    # The monitoring door went too.
    assert not run(
        ["docker", "ps", "-aq", "--filter", f"name={STACK}_monitoring-door"]
    ).stdout.split()
    # The stack's secrets (also those stack.sh keys made) went with it.
    assert not run(
        ["docker", "secret", "ls", "-q", "--filter", f"name={STACK}-api-keys"], check=False
    ).stdout.split()
