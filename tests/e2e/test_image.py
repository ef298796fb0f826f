"""The runtime images: lean for ONNX bundles, sklearn-capable when needed.

docker/Dockerfile picks the serving environment from the bundle's manifest
("backend"): an ONNX bundle gets requirements-serve.lock only, an
sklearn-only bundle the full requirements.lock. Sizes and start-to-ready
times are reported in the terminal summary, not asserted as times.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.e2e.support import (
    DOCKER_DIR,
    IMAGE,
    SETOSA,
    TIMINGS,
    http,
    run,
    start_api_container,
    wait_ready,
)

ONNX_IMAGE_LIMIT_BYTES = 250_000_000
NOT_IN_ONNX_IMAGE = ("sklearn", "scipy", "skl2onnx", "onnx")
SKLEARN_TAG = "1.0.0-sklearn"


def _size(image: str) -> int:
    return int(run(["docker", "image", "inspect", image, "--format", "{{.Size}}"]).stdout)


def _site_packages(image: str) -> set[str]:
    script = "import sysconfig, os; print('\\n'.join(os.listdir(sysconfig.get_path('purelib'))))"
    out = run(["docker", "run", "--rm", "--entrypoint", "python", image, "-c", script]).stdout
    return set(out.split())


def _started_at(cid: str) -> float:
    """The container's State.StartedAt as a Unix time (the engine's clock = ours)."""
    stamp = run(["docker", "inspect", cid, "--format", "{{.State.StartedAt}}"]).stdout.strip()
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    started = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return started + float(f"0.{fraction or 0}")


def _start_to_ready(image: str, label: str) -> dict[str, object]:
    """Times from `docker run` and from the container's start to the first 200
    of /health/ready (reported, not asserted); returns /model-info."""
    t0 = time.monotonic()
    cid, url = start_api_container(image, "-e", "WEB_CONCURRENCY=2")
    try:
        wait_ready(cid, url)
        ready_wall, ready = time.time(), time.monotonic()
        TIMINGS[f"docker run -> ready ({label})"] = ready - t0
        TIMINGS[f"container start -> ready ({label})"] = ready_wall - _started_at(cid)
        TIMINGS[f"load average then ({label})"] = (
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        predicted = http("POST", f"{url}/predict", SETOSA)
        assert predicted.status == 200, predicted.body
        assert predicted.json()["predicted_class_name"] == "setosa"
        info: dict[str, object] = http("GET", f"{url}/model-info").json()
        return info
    finally:
        run(["docker", "stop", "-t", "10", cid], check=False)


@pytest.fixture(scope="module")
def sklearn_image(image: str, base_images: dict[str, str]) -> Iterator[str]:
    env = {
        **os.environ,
        **base_images,
        "MODEL_VERSION": "1.0.0",
        "IMAGE_TAG": SKLEARN_TAG,
        "TRAIN_ARGS": "--no-onnx",
    }
    t0 = time.monotonic()
    run([str(DOCKER_DIR / "build-image.sh")], env=env, timeout=900, capture=False)
    TIMINGS["image build (sklearn-only bundle)"] = time.monotonic() - t0
    tag = f"{IMAGE.split(':')[0]}:{SKLEARN_TAG}"
    yield tag
    run(["docker", "image", "rm", tag], check=False)


def test_onnx_image_is_lean_and_has_no_sklearn_stack(image: str) -> None:
    size = _size(image)
    TIMINGS["image size (onnx runtime)"] = f"{size / 1e6:.0f} MB"
    labels = run(
        [
            "docker",
            "image",
            "inspect",
            image,
            "--format",
            '{{index .Config.Labels "io.ml-api.runtime"}}',
        ]
    ).stdout.strip()
    assert labels == "onnx"
    installed = _site_packages(image)
    assert "onnxruntime" in installed
    assert not installed & set(NOT_IN_ONNX_IMAGE), installed & set(NOT_IN_ONNX_IMAGE)
    assert size <= ONNX_IMAGE_LIMIT_BYTES, f"{size / 1e6:.0f} MB"


def test_onnx_image_start_to_ready(image: str) -> None:
    info = _start_to_ready(image, "onnx")
    assert info["backend"] == "onnx"


def test_sklearn_only_bundle_gets_the_sklearn_capable_image(sklearn_image: str) -> None:
    size = _size(sklearn_image)
    TIMINGS["image size (sklearn runtime)"] = f"{size / 1e6:.0f} MB"
    assert {"sklearn", "scipy"} <= _site_packages(sklearn_image)
    info = _start_to_ready(sklearn_image, "sklearn")
    assert info["backend"] == "sklearn"
