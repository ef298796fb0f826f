"""Error bodies are bounded: 20 errors listed plus the total, whatever the body holds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from service.manifest import Manifest
from service.middleware import error_payload
from service.predict_codec import (
    DIRECT_VALIDATION_MAX_KEYS,
    MAX_LISTED_ERRORS,
    RequestBodyError,
    _parse_bounded,
    parse_body,
)
from service.schemas import RequestModels, build_request_models
from tests.support.bundles import REPO, SETOSA

MIB = 1024 * 1024


def unknown_keys_body(size: int) -> bytes:
    """A JSON object of unknown keys, just under `size` bytes."""
    parts, length, index = [], 2, 0
    while length < size - 16:
        part = f'"k{index}":0'
        parts.append(part)
        length += len(part) + 1
        index += 1
    return ("{" + ",".join(parts) + "}").encode()


@pytest.fixture(scope="module")
def models(trained_bundle: Path) -> RequestModels:
    manifest = Manifest.model_validate_json((trained_bundle / "manifest.json").read_bytes())
    return build_request_models(manifest, 1000)


def refused(model: type[BaseModel], body: bytes) -> RequestBodyError:
    with pytest.raises(RequestBodyError) as caught:
        parse_body(model, body)
    return caught.value


def test_a_mebibyte_of_unknown_keys_lists_twenty_errors_and_the_total(
    models: RequestModels,
) -> None:
    body = unknown_keys_body(MIB)
    keys = body.count(b":")
    error = refused(models.instance, body)
    # Every unknown key, plus the four features that are missing.
    assert error.error_count == keys + 4
    assert len(error.errors) == MAX_LISTED_ERRORS + 1
    assert error.errors[-1]["type"] == "too_many_errors"
    assert error.errors[-1]["ctx"] == {"error_count": keys + 4, "listed": MAX_LISTED_ERRORS}
    assert error.errors[0] == {
        "loc": ["body", "k0"],
        "msg": "Extra inputs are not permitted",
        "type": "extra_forbidden",
    }
    assert (
        len(error_payload({"path": "/predict", "state": {"request_id": "r"}}, error.errors))
        < 8 * 1024
    )


def test_bounded_and_direct_validation_count_the_same_errors(models: RequestModels) -> None:
    # Just over the threshold, so the bounded path runs; pydantic counts directly.
    instances = [
        {**SETOSA, "petal_width": "x", **{f"extra{i}": i for i in range(40)}} for i in range(500)
    ]
    instances[3] = {"sepal_length": 1}
    body = json.dumps({"instances": instances, "also": 1}).encode()
    assert body.count(b":") > DIRECT_VALIDATION_MAX_KEYS
    with pytest.raises(ValidationError) as direct:
        models.batch.model_validate_json(body)
    error = refused(models.batch, body)
    assert error.error_count == direct.value.error_count()
    listed = {(tuple(e["loc"]), e["type"]) for e in error.errors[:-1]}
    expected = {(("body", *e["loc"]), e["type"]) for e in direct.value.errors()}
    assert len(listed) == MAX_LISTED_ERRORS
    assert listed <= expected


def test_a_large_valid_batch_parses_the_same_on_the_bounded_path(models: RequestModels) -> None:
    # A wider model's valid batch can have more keys than the direct path takes.
    body = json.dumps({"instances": [SETOSA] * 1000}).encode()
    assert _parse_bounded(models.batch, body) == models.batch.model_validate_json(body)


def test_a_too_long_batch_is_one_error_on_the_bounded_path(models: RequestModels) -> None:
    body = json.dumps({"instances": [{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}] * 5000}).encode()
    error = refused(models.batch, body)
    assert error.error_count == 1
    assert error.errors[0]["type"] == "too_long"


def test_a_hostile_body_costs_bounded_memory(trained_bundle: Path) -> None:
    # Peak memory is per process, so it is measured in a fresh one.
    script = textwrap.dedent(
        f"""
        import resource, sys
        from pathlib import Path
        from service.manifest import Manifest
        from service.predict_codec import RequestBodyError, parse_body
        from service.schemas import build_request_models
        from tests.unit.test_error_cap import unknown_keys_body
        manifest = Manifest.model_validate_json(Path({str(trained_bundle)!r}).joinpath(
            "manifest.json").read_bytes())
        models = build_request_models(manifest, 1000)
        body = unknown_keys_body({MIB})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for model in (models.instance, models.batch):
            try:
                parse_body(model, body)
            except RequestBodyError:
                pass
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    grown_kib = int(done.stdout.split()[-1])
    # Unbounded, pydantic grew this process by ~140 MiB for the same body.
    assert grown_kib < 40 * 1024, grown_kib
    print(f"peak memory growth for two hostile 1 MiB bodies: {grown_kib} KiB")
