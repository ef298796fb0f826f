"""The rolling update and a key rotation across two swarm nodes on one machine.

Node 2 is a second dockerd in its own network namespace, data root and
containerd namespace (deploy/swarm/second-node.sh), joined to this engine's
swarm over a veth pair; the api tasks talk over a VXLAN overlay that spans
both engines. The proxy and Prometheus run on this node (the manager), so
requests and scrapes to tasks on node 2 really cross the overlay.

Needs root, and an engine that is not in a swarm already (the test creates
the swarm with the veth's address and leaves it at the end); skipped
otherwise, saying why.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import IMAGE, MODEL_VERSION, TIMINGS, run, wait_for
from tests.e2e.swarm_support import (
    IMAGE_NAME,
    NEXT_VERSION,
    SECOND_NODE_SH,
    Swarm,
    add_key,
    assert_targets_are_the_tasks,
    build_image,
    remove_stack,
    remove_stack_volumes,
    report,
    stack_env,
    swarm_state,
)
from tests.support.nginx import answering_host

STACK = "ml-api-e2e2"
HOST_ADDR = "10.231.0.1"


def _second_node(*args: str, check: bool = True) -> None:
    run([str(SECOND_NODE_SH), *args], check=check, timeout=300, capture=False)


@pytest.fixture(scope="module")
def two_nodes(image: str, base_images: dict[str, str]) -> Iterator[Swarm]:
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("nsenter")):
        pytest.skip("a second dockerd needs root, ip and nsenter")
    if swarm_state() != "inactive":
        pytest.skip("this engine is in a swarm already; the two-node test makes its own")
    env = stack_env(base_images, STACK, MODEL_VERSION)
    env["BACKEND_SUBNET"] = "10.232.10.0/24"
    env["SWARM_ADVERTISE_ADDR"] = HOST_ADDR
    build_image(env, NEXT_VERSION)
    sw = Swarm(STACK, env)
    remove_stack_volumes(STACK)
    t0 = time.monotonic()
    try:
        _second_node("up")
        sw.stack("init")
        _second_node("join", IMAGE, f"{IMAGE_NAME}:{NEXT_VERSION}")
        TIMINGS["two nodes: node 2 up, swarm joined, images copied"] = time.monotonic() - t0
        sw.stack("up")
        yield sw
    finally:
        remove_stack(sw)
        _second_node("down", check=False)
        TIMINGS["two nodes: swarm after the test"] = swarm_state()


def _nodes(sw: Swarm) -> set[str]:
    return set(sw.tasks().values())


def test_rolling_update_across_two_nodes_loses_no_request(two_nodes: Swarm) -> None:
    sw = two_nodes
    assert (
        len(
            wait_for(
                "api tasks on both nodes", lambda: _nodes(sw) if len(_nodes(sw)) == 2 else None
            )
        )
        == 2
    )
    assert_targets_are_the_tasks(sw, 3)
    since = time.time()
    with sw.load() as load:
        time.sleep(2)
        t0 = time.monotonic()
        done = sw.stack("rollout", NEXT_VERSION, check=False)
        converged = time.monotonic()
        TIMINGS["two nodes: rolling update 1.0.0 -> 1.1.0"] = converged - t0
        time.sleep(3)
    assert done.returncode == 0, done.stderr
    report("two nodes: rolling update", load, sw, since)
    assert load.versions_since(converged) == {NEXT_VERSION}
    tasks = sw.tasks()
    assert len(set(tasks.values())) == 2, tasks
    assert_targets_are_the_tasks(sw, 3)
    # The proxy (on this node) reaches the tasks on node 2 over the overlay.
    answered = {answering_host(sw.predict().headers["x-upstream-addr"]) for _ in range(30)}
    assert answered == set(tasks), (answered, tasks)


def test_a_key_rotation_is_confirmed_live_in_the_tasks_of_both_nodes(two_nodes: Swarm) -> None:
    """stack.sh keys asks the keys tasks which copier holds what, so when it
    returns the new key works in the api tasks on node 2 as well."""
    sw = two_nodes
    new = {"Authorization": f"Bearer {add_key(Path(sw.env['API_KEYS_FILE']), 'e2e-two-nodes')}"}
    t0 = time.monotonic()
    done = sw.stack("keys")
    TIMINGS["two nodes: key rotation"] = time.monotonic() - t0
    assert "live in the proxy and the 3 api task(s), on every node" in done.stderr, done.stderr
    tasks = sw.tasks()
    assert len(set(tasks.values())) == 2, tasks
    answered = {}
    for _ in range(30):
        answer = sw.predict(headers=new)
        answered[answering_host(answer.headers["x-upstream-addr"])] = answer.status
    assert answered == dict.fromkeys(tasks, 200), (answered, tasks)
