"""End-to-end tier: the real image, the compose stack, a real Docker engine.

Runs only when ML_API_E2E=1 (``make e2e`` sets it), so ``pytest`` over the
whole tree stays fast and needs no Docker. The session fixtures:

1. make sure an engine runs (docker/ensure-engine.sh installs and starts one;
   it is stopped afterwards only if this session started it);
2. pick base images: the official ones when they are present or can be pulled,
   else the Debian-built stand-ins from docker/offline-images.sh;
3. build the image (docker/build-image.sh);
4. ``docker compose up --wait`` api, proxy and prometheus under a project name
   of its own, on free loopback ports, and ``down -v`` at the end.

Timings (build, up, first prediction) are printed in the terminal summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.auth import keyfile
from tests.e2e.support import (
    API_KEY_SETTINGS,
    API_KEYS_FILE,
    BACKEND_SUBNET,
    DOCKER_DIR,
    IMAGE,
    MODEL_VERSION,
    OFFICIAL,
    OFFLINE,
    PROJECT,
    ROOT,
    TIMINGS,
    Stack,
    engine_up,
    free_port,
    run,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: needs a Docker engine; run with `make e2e`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    enabled = os.environ.get("ML_API_E2E") == "1"
    skip = pytest.mark.skip(reason="end-to-end tier: run `make e2e` (ML_API_E2E=1)")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            if not enabled:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("ml-api e2e measurements")
    for key, value in TIMINGS.items():
        shown = f"{value:.1f} s" if isinstance(value, float) else value
        terminalreporter.write_line(f"{key:<34} {shown}")
    report = os.environ.get("E2E_REPORT")
    if report:
        Path(report).write_text(json.dumps(TIMINGS, indent=2) + "\n")


# ------------------------------------------------------------- fixtures ---


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    started_here = not engine_up()
    t0 = time.monotonic()
    run([str(DOCKER_DIR / "ensure-engine.sh"), "start"], timeout=900, capture=False)
    TIMINGS["engine ready"] = time.monotonic() - t0
    TIMINGS["engine started by this run"] = "yes" if started_here else "no"
    try:
        yield
    finally:
        if started_here:
            run([str(DOCKER_DIR / "ensure-engine.sh"), "stop"], check=False, timeout=120)


def _have(image: str) -> bool:
    return run(["docker", "image", "inspect", image], check=False).returncode == 0


def _can_pull(images: list[str]) -> bool:
    for image in images:
        if _have(image):
            continue
        try:
            if run(["docker", "pull", "-q", image], check=False, timeout=300).returncode != 0:
                return False
        except subprocess.TimeoutExpired:
            return False
    return True


@pytest.fixture(scope="session")
def base_images(engine: None) -> dict[str, str]:
    """Official images when reachable, else the offline stand-ins (built once)."""
    mode = os.environ.get("ML_API_OFFLINE", "auto")
    if mode == "0" or (mode == "auto" and _can_pull(list(OFFICIAL.values()))):
        TIMINGS["base images"] = "official"
        return dict(OFFICIAL)
    t0 = time.monotonic()
    run([str(DOCKER_DIR / "offline-images.sh")], timeout=900, capture=False)
    TIMINGS["offline images"] = time.monotonic() - t0
    TIMINGS["base images"] = "offline (Debian-built)"
    return dict(OFFLINE)


@pytest.fixture(scope="session")
def image(base_images: dict[str, str]) -> str:
    env = {**os.environ, **base_images, "MODEL_VERSION": MODEL_VERSION}
    t0 = time.monotonic()
    run([str(DOCKER_DIR / "build-image.sh")], env=env, timeout=900, capture=False)
    TIMINGS["image build"] = time.monotonic() - t0
    size = run(["docker", "image", "inspect", IMAGE, "--format", "{{.Size}}"]).stdout.strip()
    TIMINGS["runtime image size"] = f"{int(size) / 1e6:.0f} MB"
    return IMAGE


@pytest.fixture(scope="session")
def stack(image: str, base_images: dict[str, str]) -> Iterator[Stack]:
    env = {
        **os.environ,
        **base_images,
        "MODEL_VERSION": MODEL_VERSION,
        "PROXY_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "ALERTMANAGER_PORT": str(free_port()),
        # The stack plus the test's alert receiver (the shipped Alertmanager
        # configuration's webhook).
        "COMPOSE_FILE": f"compose.yaml{os.pathsep}tests/e2e/alert-receiver.yaml",
        "BACKEND_SUBNET": BACKEND_SUBNET,
        "COMPOSE_PROJECT_NAME": PROJECT,
        **API_KEY_SETTINGS,
    }
    # Docker needs the secret's file (AUTH=off: the API runs open). Compose
    # bind-mounts it into containers that run as other users: readable.
    API_KEYS_FILE.unlink(missing_ok=True)
    keyfile.update(API_KEYS_FILE)
    API_KEYS_FILE.chmod(0o644)
    st = Stack(
        env=env,
        proxy=f"http://127.0.0.1:{env['PROXY_PORT']}",
        prometheus=f"http://127.0.0.1:{env['PROMETHEUS_PORT']}",
    )
    st.compose("down", "-v", "--remove-orphans", check=False)  # leftovers of an aborted run

    # `up --wait` in the background; meanwhile poll for the first prediction.
    t0 = time.monotonic()
    up = subprocess.Popen(
        [
            "docker",
            "compose",
            "-p",
            PROJECT,
            "up",
            "-d",
            "--wait",
            "api",
            "proxy",
            "prometheus",
            "alertmanager",
            "alert-webhook",
        ],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out_box: list[str] = []
    reader = threading.Thread(target=lambda: out_box.append(up.stdout.read() if up.stdout else ""))
    reader.start()
    first: float | None = None
    deadline = t0 + 240
    try:
        while time.monotonic() < deadline and first is None:
            try:
                if st.predict(timeout=2).status == 200:
                    first = time.monotonic() - t0
            except OSError:
                pass
            if first is None:
                if up.poll() not in (None, 0):
                    break
                time.sleep(0.2)
        rc = up.wait(timeout=max(1.0, deadline - time.monotonic()))
        reader.join(timeout=10)
        if rc != 0:
            logs = st.compose("logs", "--no-color", "--tail", "50", check=False).stdout
            raise AssertionError(f"compose up --wait exited {rc}\n{''.join(out_box)}\n{logs}")
        TIMINGS["compose up --wait"] = time.monotonic() - t0
        assert first is not None, "no prediction answered through the proxy within 240 s"
        st.first_prediction_s = first
        TIMINGS["up -> first prediction"] = first
        yield st
    finally:
        if up.poll() is None:
            up.kill()
        reader.join(timeout=10)
        if up.stdout is not None:
            up.stdout.close()
        if os.environ.get("E2E_KEEP_STACK") != "1":
            st.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets fixtures see whether the test body failed (for log dumps).
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
