from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.backends.onnx import SingleRowCall
from service.settings import ServiceSettings
from tests.support.bundles import model_sha256

ClientFactory = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture
def make_client(model_dir: Path, tmp_path: Path) -> ClientFactory:
    """Start the real app (lifespan included) with settings overrides; no API
    keys (AUTH=off) unless `api_keys_file` is given (a developer's secrets/ stays out)."""

    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        # The test bundle's pickle is pinned, as an operator would pin theirs.
        overrides.setdefault("trusted_model_sha256", model_sha256(model_dir / "iris" / "1.0.0"))
        if "api_keys_file" not in overrides:
            overrides.update(api_keys_file=tmp_path / "no-api-keys", auth="off")
        settings = ServiceSettings(model_dir=model_dir, **overrides)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield client

    return factory


@pytest.fixture(params=["onnx", "sklearn"])
def client(request: pytest.FixtureRequest, make_client: ClientFactory) -> Iterator[TestClient]:
    """The app on each backend: every API rule must hold on both."""
    with make_client(backend=request.param) as test_client:
        yield test_client


@pytest.fixture
def onnx_client(make_client: ClientFactory) -> Iterator[TestClient]:
    with make_client() as test_client:
        yield test_client


@pytest.fixture
def row_calls(monkeypatch: pytest.MonkeyPatch) -> list[Sequence[float]]:
    """The rows that took the ONNX backend's plain-Python row call."""
    calls: list[Sequence[float]] = []
    original_row_call = SingleRowCall.row

    def counted(self: SingleRowCall, values: Sequence[float]) -> Sequence[float] | None:
        calls.append(values)
        return original_row_call(self, values)

    monkeypatch.setattr(SingleRowCall, "row", counted)
    return calls
